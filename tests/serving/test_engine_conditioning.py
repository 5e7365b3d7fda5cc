"""A group's prompts on the standard path (registered subjects with embeddings, zero-shot
subjects) go through the text encoder in one call (Engine._encode_pending), on the tiny model:
each request's states and images are those it gets alone, and a failure of that call falls
back to one call a request, so a bad prompt fails only its own request."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.model import BlipDiffusion
from pipeline.serving.engine import Engine, Job
from pipeline.serving.requests import GenerationRequest
from pipeline.serving.subjects import ZeroShotSubject, read_subject
from tests.serve_subjects import TINY

STEPS = 2
PHOTO = Image.new("RGB", (64, 48), "navy")


@pytest.fixture(scope="module")
def subjects(lora_folders):
    return {name: read_subject(lora_folders[name], name, "1") for name in "ab"}


def engine():
    return Engine(BlipDiffusion.from_pretrained(TINY), max_batch_images=8, max_subjects=8, max_lora_adapters=8)


def job(subject, seed, num_images=1, prompt="on the beach", negative=None):
    return Job(GenerationRequest(prompt, num_images, seed, STEPS, 7.5, negative, None, None), subject, 64, 64)


def group(subjects):
    """Four standard-path requests: two LoRA subjects, a zero-shot one, 1 and 2 images, two negative prompts."""
    a, b = subjects["a"], subjects["b"]
    return [job(a, 5), job(b, 6, num_images=2, prompt="in the snow"), job(ZeroShotSubject((PHOTO,), "dog"), 7),
            job(a, 8, prompt="on a sofa", negative="blurry")]


def pixels(images):
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def record_conditions(monkeypatch, model):
    """A list that gets the cond states (N, 77, D) of each denoising call of `model`."""
    conds, denoise = [], model._denoise

    def recorded(latents, cond, *args, **kwargs):
        conds.append(cond.clone())
        return denoise(latents, cond, *args, **kwargs)

    monkeypatch.setattr(model, "_denoise", recorded)
    return conds


def test_a_groups_prompts_go_through_the_text_encoder_in_one_call(subjects, monkeypatch):
    """A batch of 8 one-image requests made 8 eager text-encoder calls for its prompts (its
    condition phase 0.176 s against 0.023 s for one request on an H100): one call now, plus one
    a distinct negative prompt."""
    served = engine()
    positives, encode = [], served.model.encode_prompts

    def counted(texts, embeds, *args, **kwargs):
        if embeds is not None:
            positives.append(len(texts))
        return encode(texts, embeds, *args, **kwargs)

    monkeypatch.setattr(served.model, "encode_prompts", counted)
    forwards = []
    served.model.text_encoder.register_forward_hook(lambda *_: forwards.append(1))
    jobs = served.run(group(subjects))
    assert all(j.error is None for j in jobs), [j.error for j in jobs]
    assert [len(j.images) for j in jobs] == [1, 2, 1, 1]
    assert positives == [5]  # every prompt of the group, 1 + 2 + 1 + 1 images, in one call
    assert len(forwards) == 1 + 2  # the prompts, then the default negative prompt and "blurry"


def test_each_request_gets_the_states_and_images_it_gets_alone(subjects, monkeypatch):
    served = engine()
    conds = record_conditions(monkeypatch, served.model)
    alone = [pixels(served.run([j])[0].images) for j in group(subjects)]
    alone_conds, conds[:] = torch.cat(conds), []
    jobs = served.run(group(subjects))
    [together] = conds  # one chunk: 5 images, max_batch_images 8
    # Each request's rows in its own place, as the text encoder gives them alone (float32 CPU;
    # a bigger batch of the same matmuls may round differently).
    torch.testing.assert_close(together, alone_conds, atol=1e-5, rtol=1e-5)
    for got, want in zip(jobs, alone, strict=True):
        # The same images up to float rounding of a different batch (at most one level of 255).
        assert got.error is None and np.abs(pixels(got.images) - want).max() <= 1


def test_when_the_prompts_cannot_be_encoded_together_each_request_encodes_its_own(subjects, monkeypatch):
    served = engine()
    a = subjects["a"]

    def requests():
        bad = job(a, 3, prompt="on the \ud800 beach")  # the tokenizer raises TypeError on a lone surrogate
        return [job(a, 5), job(subjects["b"], 6, prompt="in the snow"), bad, job(ZeroShotSubject((PHOTO,), "dog"), 7)]

    alone = [served.run([j])[0] for j in requests()]
    assert isinstance(alone[2].error, TypeError)
    encode, together = served.model.encode_prompts, []

    def fails_together(texts, embeds, *args, **kwargs):
        if embeds is not None and len(texts) > 1:  # every request here draws one image: only the group's call
            together.append(len(texts))
            raise RuntimeError("a batch the text encoder cannot take")
        return encode(texts, embeds, *args, **kwargs)

    monkeypatch.setattr(served.model, "encode_prompts", fails_together)
    good, other, poisoned, zero_shot = served.run(requests())
    assert together == [4]
    assert isinstance(poisoned.error, TypeError) and poisoned.images is None
    for got, want in zip((good, other, zero_shot), (alone[0], alone[1], alone[3]), strict=True):
        assert got.error is None and np.abs(pixels(got.images) - pixels(want.images)).max() <= 1

    def out_of_memory(texts, embeds, *args, **kwargs):
        if embeds is not None and len(texts) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return encode(texts, embeds, *args, **kwargs)

    # Out of memory is not a request's fault: its group fails as one (Engine.run frees the cache), no retry one by one.
    monkeypatch.setattr(served.model, "encode_prompts", out_of_memory)
    jobs = served.run([job(a, 5), job(a, 6)])
    assert all(isinstance(j.error, torch.OutOfMemoryError) for j in jobs)


def test_draw_queues_a_group_and_finishing_gives_each_job_what_run_gives(subjects):
    """Engine.draw returns with each job's images still on their way (`Job.drawn`, drawn.py);
    finish_jobs fills them and the phase timings: the images `run` draws, each job its own."""
    from pipeline.serving.drawn import finish_jobs

    served = engine()
    expected = [pixels(j.images) for j in served.run(group(subjects))]
    jobs = served.draw(group(subjects))
    assert all(j.images is None and j.error is None and j.drawn is not None for j in jobs)
    assert len({id(j.drawn) for j in jobs}) == 1  # one group, drawn together
    finish_jobs(jobs)
    assert all(j.drawn is None and j.error is None for j in jobs)
    for got, want in zip(jobs, expected, strict=True):
        np.testing.assert_array_equal(pixels(got.images), want)
        assert set(got.timings) == {"queue", "condition", "denoise", "decode"} and min(got.timings.values()) >= 0
