"""The serving engine on the tiny model, without Serve: a batch mixing subjects draws each
request as its subject alone draws it (`SubjectModel.generate`, what `subjectforge generate`
runs), LoRA subjects never see each other's adapters, a failed group fails only its own
requests, and each drawn request knows its queue and its group's phases."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.model import BlipDiffusion
from pipeline.model.prompts import DEFAULT_NEGATIVE_PROMPT
from pipeline.model.schedulers import fresh_scheduler
from pipeline.model.subject import SubjectModel
from pipeline.serving.engine import BatchCancelled, Engine, Job
from pipeline.serving.requests import GenerationRequest
from pipeline.serving.subjects import ZeroShotSubject, read_subject
from tests.serve_subjects import TINY, fail_first_call, make_subject

STEPS = 2


@pytest.fixture(scope="module")
def subjects(tmp_path_factory, lora_folders):
    root = tmp_path_factory.mktemp("engine")
    folders = {
        "a": lora_folders["a"],  # tests/serving/conftest.py: LoRA subjects of seeds 1 and 2
        "b": lora_folders["b"],
        "ti": make_subject(root / "ti", "textual-inversion", 3),
        "full": make_subject(root / "full", "blipd", 4),
    }
    return {name: (folder, read_subject(folder, name, "1")) for name, folder in folders.items()}


def request(seed, num_images=1, guidance=7.5):
    return GenerationRequest("on the beach", num_images, seed, STEPS, guidance, None, None, None)


def job(subject, seed, **kwargs):
    return Job(request(seed, **kwargs), subject, 64, 64)


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


@functools.cache
def _own_model(folder):
    return SubjectModel.load(folder)


@functools.cache
def alone(folder, seed, num_images=1, guidance=7.5):
    """What `subjectforge generate --model models:/...` draws: the subject on its own base.
    Drawn once a module for each (subject, seed, images, guidance), read-only: several tests
    compare against the same draws."""
    drawn = pixels(_own_model(folder).generate("on the beach", num_images=num_images, seed=seed, steps=STEPS,
                                               guidance_scale=guidance))
    drawn.setflags(write=False)
    return drawn


def test_a_mixed_batch_draws_each_subject_as_it_is_drawn_alone(subjects):
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=3, max_subjects=8, max_lora_adapters=8)
    (a_dir, a), (b_dir, b), (ti_dir, ti), (full_dir, full) = (subjects[k] for k in ("a", "b", "ti", "full"))
    photo = Image.new("RGB", (64, 64), "red")
    jobs = engine.run([
        job(b, 5), job(a, 5), job(ti, 7, num_images=2), job(ZeroShotSubject((photo,), "dog"), 5),
        job(a, 9, guidance=3.0), job(full, 5), job(b, 6, num_images=2),
    ])
    assert all(j.error is None for j in jobs)
    zero_shot = BlipDiffusion.from_pretrained(TINY).generate(
        "on the beach", subject_images=[photo], category="dog", seed=5, steps=STEPS, height=64, width=64, progress=False)
    expected = [alone(b_dir, 5), alone(a_dir, 5), alone(ti_dir, 7, 2), pixels(zero_shot), alone(a_dir, 9, guidance=3.0),
                alone(full_dir, 5), alone(b_dir, 6, 2)]
    for got, want in zip(jobs, expected, strict=True):
        # The same images up to float rounding of a different batch (at most one level of 255).
        assert np.abs(pixels(got.images) - want).max() <= 1
    assert np.abs(expected[0] - expected[1]).max() > 20  # A and B draw visibly different images


def test_lora_subjects_never_see_each_others_weights(subjects):
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    a, b = subjects["a"][1], subjects["b"][1]
    [first] = engine.run([job(a, 11)])
    interleaved = engine.run([job(b, 11), job(a, 11), job(b, 12)])
    [last] = engine.run([job(a, 11)])
    # Interleaved rows share one UNet call, each with its own adapter: A's image stays A's, up
    # to float rounding of the bigger batch; alone again, it is A's exactly.
    assert np.abs(pixels(first.images) - pixels(interleaved[1].images)).max() <= 1
    assert np.array_equal(pixels(first.images), pixels(last.images))
    assert np.abs(pixels(first.images) - pixels(interleaved[0].images)).max() > 20


def test_an_evicted_adapter_is_loaded_again_and_draws_the_same(subjects):
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=1, max_lora_adapters=1)
    a, b = subjects["a"][1], subjects["b"][1]
    [first] = engine.run([job(a, 3)])
    engine.run([job(b, 3)])
    assert engine.adapters == ["b/1"]
    [again] = engine.run([job(a, 3)])
    assert engine.adapters == ["a/1"]
    assert np.array_equal(pixels(first.images), pixels(again.images))
    for name, layer in engine._lora.layers.items():  # the evicted subject's weights are gone from the UNet: a's took its slot
        assert torch.equal(layer.slot_B[1, :, :4], a.lora[f"{name}.lora_B.weight"])


def test_a_batch_of_more_lora_subjects_than_slots_is_drawn_in_parts(subjects):
    # A batch is the batcher's grouping, not the callers' doing: with one slot, two LoRA subjects
    # batched together failed both requests ("2 LoRA subjects in one batch").
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=1)
    (a_dir, a), (b_dir, b) = subjects["a"], subjects["b"]
    jobs = engine.run([job(a, 5), job(b, 5), job(a, 6)])
    assert all(j.error is None for j in jobs), [j.error for j in jobs]
    assert np.abs(pixels(jobs[0].images) - alone(a_dir, 5)).max() <= 1
    assert np.abs(pixels(jobs[1].images) - alone(b_dir, 5)).max() <= 1
    assert np.abs(pixels(jobs[2].images) - alone(a_dir, 6)).max() <= 1


def test_out_of_memory_fails_its_group_only_and_the_engine_goes_on(subjects, monkeypatch):
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    a, ti = subjects["a"][1], subjects["ti"][1]
    fail_first_call(monkeypatch, engine.model, "_denoise", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    jobs = engine.run([job(ti, 1), job(a, 2), Job(request(1), a, 32, 32)])  # two groups: two sizes
    assert [type(j.error).__name__ for j in jobs] == ["OutOfMemoryError", "OutOfMemoryError", "NoneType"]
    [retry] = engine.run([job(ti, 1)])
    assert retry.error is None and len(retry.images) == 1


def test_each_job_has_its_queue_and_its_groups_phases_and_a_later_group_queues_behind_the_earlier(subjects):
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    a = subjects["a"][1]
    first, second, later = engine.run([job(a, 1), job(a, 2), Job(request(3), a, 32, 32)])  # two groups: two sizes
    for drawn in (first, second, later):
        assert set(drawn.timings) == {"queue", "condition", "denoise", "decode"} and min(drawn.timings.values()) >= 0
        assert drawn.timings["denoise"] > 0 and drawn.timings["decode"] > 0
    # One group's requests share its phases; the next group waits for all of them.
    assert {k: v for k, v in first.timings.items() if k != "queue"} == {k: v for k, v in second.timings.items() if k != "queue"}
    assert later.timings["queue"] >= first.timings["condition"] + first.timings["denoise"] + first.timings["decode"]


def test_a_request_whose_prompt_cannot_be_encoded_fails_alone_not_its_batch(subjects):
    """A lone surrogate (refused by the API's checks) made the tokenizer raise TypeError for one
    request, and every request batched with it got a 500: conditioning is each request's own."""
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    a = subjects["a"][1]
    bad = Job(GenerationRequest("on the \ud800 beach", 1, 1, STEPS, 7.5, None, None, None), a, 64, 64)
    good, poisoned, after = engine.run([job(a, 2), bad, job(a, 3)])
    assert isinstance(poisoned.error, TypeError) and poisoned.images is None
    assert good.error is None and after.error is None and len(good.images) == len(after.images) == 1


def count_unet_calls(engine, then=None):
    """A list that gets an entry per UNet call of `engine`; `then(calls)` runs after each."""
    calls = []

    def hook(*_):
        calls.append(1)
        if then is not None:
            then(len(calls))

    engine.model.unet.register_forward_hook(hook)
    return calls


def test_a_batch_whose_requests_all_left_stops_after_the_current_step(subjects, monkeypatch):
    """Clients that leave a running batch of 8 images x 150 steps made it run to the end: a batch
    whose requests are all cancelled (app.py marks them) now stops between two steps."""
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    a = subjects["a"][1]
    jobs = [Job(GenerationRequest("on the beach", 2, seed, 10, 7.5, None, None, None), a, 64, 64) for seed in (1, 2)]
    decode, decodes = engine.model.vae.decode, []

    def counted_decode(*args, **kwargs):
        decodes.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(engine.model.vae, "decode", counted_decode)

    def leave(calls):  # during step 3 the first client leaves, during step 4 the second
        if calls >= 3:
            jobs[0].cancelled.set()
        if calls >= 4:
            jobs[1].cancelled.set()

    calls = count_unet_calls(engine, then=leave)
    engine.run(jobs)
    assert len(calls) == 4 and not decodes  # step 4 finished, then nothing more: no step 5, no decoding
    for j in jobs:
        assert j.images is None and isinstance(j.error, BatchCancelled) and "stopped after step 4" in str(j.error)
    # One request left, the other still waits: the batch draws every step for it (PNDM's
    # timesteps, one more than STEPS).
    scheduler = fresh_scheduler(engine.model.scheduler)
    scheduler.set_timesteps(STEPS)
    every_step = len(scheduler.timesteps)
    waiting = [job(a, 3), job(a, 4)]
    waiting[0].cancelled.set()
    calls.clear()
    engine.run(waiting)
    assert len(calls) == every_step and all(j.error is None and len(j.images) == 1 for j in waiting)
    # A group whose requests all left before it started draws nothing, and the engine goes on.
    gone = job(a, 5)
    gone.cancelled.set()
    calls.clear()
    left, after = engine.run([gone, Job(request(6), a, 32, 32)])  # two groups: two sizes
    assert left.images is None and isinstance(left.error, BatchCancelled) and len(calls) == every_step
    assert after.error is None and len(after.images) == 1
    # A request that failed alone (its prompt) keeps its own error when the rest of its group left.
    bad = Job(GenerationRequest("on the \ud800 beach", 1, 1, STEPS, 7.5, None, None, None), a, 64, 64)
    gone = job(a, 7)
    gone.cancelled.set()
    poisoned, left = engine.run([bad, gone])
    assert isinstance(poisoned.error, TypeError) and isinstance(left.error, BatchCancelled)


def test_an_edit_whose_client_left_stops_after_the_current_step(subjects):
    """An edit ran all its inversion and denoising steps after its client had gone."""
    from pipeline.serving.edits import EditRequest

    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    subject = ZeroShotSubject((photo,), "dog")
    edit = Job(GenerationRequest("a dog on the beach", 1, 1, 10, 7.5, None, None, None), subject, 64, 64,
               edit=EditRequest("dog", photo))
    calls = count_unet_calls(engine, then=lambda n: edit.cancelled.set() if n >= 3 else None)
    [done] = engine.run([edit])
    assert len(calls) == 3  # inversion step 3 finished, then nothing more (10 inversion + 10 denoising steps otherwise)
    assert done.images is None and isinstance(done.error, BatchCancelled) and "stopped after step 3" in str(done.error)
    calls.clear()
    kept = Job(GenerationRequest("a dog on the beach", 1, 1, 2, 7.5, None, None, None), subject, 64, 64,
               edit=EditRequest("dog", photo))
    [kept] = engine.run([kept])  # nobody left: the whole edit
    assert kept.error is None and len(kept.images) == 1 and len(calls) > 2


def test_a_group_encodes_each_negative_prompt_once_and_draws_what_it_drew(subjects, monkeypatch):
    """Every guided request needs its negative prompt's encoding, and most use the default: a
    group of four requests with two negative prompts encodes two, not four, and draws the same
    images as requests encoded one by one (each drawn alone)."""
    (_, a), (_, b) = subjects["a"], subjects["b"]
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)

    def group():
        other = GenerationRequest("on the beach", 1, 8, STEPS, 7.5, "blurry", None, None)
        return [job(a, 5), job(b, 6, num_images=2), Job(other, a, 64, 64), job(a, 7)]

    alone_images = [pixels(engine.run([j])[0].images) for j in group()]
    negatives, encode = [], engine.model.encode_prompts

    def counted(texts, embeds, *args, **kwargs):
        if embeds is None:  # a prompt without a subject: a negative one here
            negatives.extend(texts)
        return encode(texts, embeds, *args, **kwargs)

    monkeypatch.setattr(engine.model, "encode_prompts", counted)
    jobs = engine.run(group())
    assert sorted(negatives) == sorted(["blurry", DEFAULT_NEGATIVE_PROMPT])
    for got, want in zip(jobs, alone_images, strict=True):
        assert got.error is None and np.abs(pixels(got.images) - want).max() <= 1


def test_a_groups_zero_shot_photos_are_encoded_in_one_call_and_draw_what_each_draws_alone(monkeypatch):
    """Three zero-shot requests (1, 2 and 1 photos, two categories) in one group: one pass of
    the ViT and Q-Former over the four photos, and each request's images within a level of
    those it draws alone (its embeddings the mean over its own photos, as encode_subject)."""
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    photos = [Image.new("RGB", (64, 48), color) for color in ("red", "navy", "olive", "white")]

    def group():
        return [job(ZeroShotSubject((photos[0],), "dog"), 5), job(ZeroShotSubject((photos[1], photos[2]), "cat"), 6),
                job(ZeroShotSubject((photos[3],), "dog"), 7, num_images=2)]

    alone_images = [pixels(engine.run([j])[0].images) for j in group()]
    batches, embed = [], engine.model.subject_embeddings

    def counted(pixel_values, categories):
        batches.append(list(categories))
        return embed(pixel_values, categories)

    monkeypatch.setattr(engine.model, "subject_embeddings", counted)
    jobs = engine.run(group())
    assert batches == [["dog", "cat", "cat", "dog"]]
    for got, want in zip(jobs, alone_images, strict=True):
        assert got.error is None and np.abs(pixels(got.images) - want).max() <= 1


def test_when_the_photos_cannot_be_encoded_together_each_request_encodes_its_own(monkeypatch):
    engine = Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)
    photos = [Image.new("RGB", (64, 48), color) for color in ("red", "navy")]
    fail_first_call(monkeypatch, engine.model, "subject_embeddings", ValueError("a photo the batch cannot take"))
    jobs = engine.run([job(ZeroShotSubject((photos[0],), "dog"), 5), job(ZeroShotSubject((photos[1],), "cat"), 6)])
    assert all(j.error is None and len(j.images) == 1 for j in jobs)
