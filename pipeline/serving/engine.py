"""The model side of a serving replica: one base BLIP-Diffusion, many subjects, batched jobs.

`Engine.run(jobs)` draws a batch of requests from any callers. Jobs are grouped by what must be
equal inside one denoising batch: steps, size, whether guidance runs, and the UNet that draws
them. The base UNet draws zero-shot, textual-inversion and LoRA subjects together: embeddings
differ row by row, and each LoRA subject fills a slot of the base UNet's LoRA layers
(lora_slots.py). Before a chunk's denoising the engine gives the slot of every row (0, the base,
for rows without a LoRA subject). Rows of several slots: each layer adds each row's own slot's
update, so no request sees another's weights. With `lora_merge` (serve.lora_merge) the layers
skip the per-row products: rows of one slot (one LoRA subject, or none) run with that slot
merged into a working copy of their weights, and rows of several slots each on a working copy
of its own, merged with its row's slot; merges are kept while the next chunks draw the same
slots, and the UNet's own weights stay the base's. A compiled UNet draws any mix of subjects
with one graph per mode (per-row products, merged, per-row merged). A blipd or dreambooth subject's group
runs on a spare UNet holding that subject's full weights. A request's noise comes from a CPU
generator seeded with its own seed, as `subjectforge generate` makes it, so a seed gives the
same images whatever it is batched with (up to float rounding of the batch).

Conditioning is shared where it can be: a group encodes each negative prompt once, its
zero-shot requests' photos in one pass of the ViT and Q-Former, and the prompts of its requests
on the standard path (subject embeddings before the category word: registered, zero-shot and
mixed subjects) in one call of the text encoder, which runs eagerly and pays its launches per
call; slot, dreambooth and textual-inversion prompts are encoded each on its own. Each drawn
job gets the seconds of its queue and its group's conditioning, denoising and decoding
(job.timings, serving/timings.py).

Everything here runs on one thread (the replica's compute thread): slots are filled, rows set
and slots merged only between chunks. No Ray, HTTP or MLflow here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from pipeline.config import EditConfig, ServeConfig
from pipeline.model import BlipDiffusion
from pipeline.model.blip_diffusion import StepCallback, to_device_async
from pipeline.model.prompts import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT_REPS, build_prompt, check_text
from pipeline.model.schedulers import fresh_scheduler
from pipeline.serving.cache import LruBudget
from pipeline.serving.controls import ControlRequest, control_tensor
from pipeline.serving.drawn import DrawnGroup, finish_jobs
from pipeline.serving.edits import EditRequest, draw_edit
from pipeline.serving.lora_slots import BASE_SLOT, LoraSlots, LoraUnfit
from pipeline.serving.requests import GenerationRequest
from pipeline.serving.slots import slot_parts
from pipeline.serving.subjects import MixedSubject, RegisteredSubject, SubjectUnusable, ZeroShotSubject
from pipeline.serving.timings import PhaseClock

log = logging.getLogger(__name__)

BASE = ("base",)  # the group key part of subjects drawn by the base UNet


@dataclass
class Job:
    """One request's images: its checked fields, its subject and the size it is drawn at."""

    request: GenerationRequest
    subject: RegisteredSubject | ZeroShotSubject
    height: int
    width: int
    enqueued: float = field(default_factory=time.monotonic)  # when the request joined the queue
    # Seconds of queue, condition, denoise and decode (serving/timings.py), set when its images are drawn.
    timings: dict[str, float] = field(default_factory=dict)
    images: list[PIL.Image.Image] | None = None
    error: BaseException | None = None  # set instead of images when its group failed
    control: ControlRequest | None = None  # a structure control: drawn in a group of its own
    edit: EditRequest | None = None  # an edit of a generated image or a photo: drawn in a group of its own
    slots: bool = False  # the prompt names its subjects in [slots] (serving/slots.py match_slots)
    # Set by the event loop when the request's client left (app.py); read by the compute thread between steps.
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Its group's images on their way to the host, from Engine.draw until `finish_jobs` (drawn.py).
    drawn: DrawnGroup | None = None

    @property
    def unet_key(self) -> tuple[str, ...]:
        """Which UNet draws it: the base (with or without a LoRA slot), or a full subject UNet."""
        subject = self.subject
        if isinstance(subject, ZeroShotSubject | MixedSubject) or subject.spec.traits.unet != "full":
            return BASE
        return ("full", subject.key)

    @property
    def adapter_key(self) -> str | None:
        """The subject whose LoRA slot draws it, or None (the UNet's own weights)."""
        subject = self.subject
        return subject.key if isinstance(subject, RegisteredSubject) and subject.spec.traits.unet == "lora" else None

    @property
    def group_key(self) -> tuple[Any, ...]:
        r = self.request
        # A ControlNet's map is shared by its batch (pipeline/model/control.py Control), so a job
        # with a control is a group of one.
        alone = id(self) if self.control is not None or self.edit is not None else None
        return (r.steps, self.height, self.width, r.guidance_scale > 1.0, self.unet_key, alone)


class BatchCancelled(Exception):
    """Every request of a group left before its images were done: its denoising stopped."""


def all_cancelled(jobs: list[Job]) -> bool:
    return all(job.cancelled.is_set() for job in jobs)


def stop_when_all_cancelled(jobs: list[Job]) -> StepCallback:
    """A step_callback for BlipDiffusion._denoise that raises BatchCancelled after the step in
    which the last of `jobs` was cancelled. While any of them still waits, the batch goes on: its
    rows share every UNet call, and a cancelled request's rows cost no more than padding would."""

    def check(step: int, *_: Any) -> None:
        if all_cancelled(jobs):
            raise BatchCancelled(f"all {len(jobs)} request(s) of the batch were cancelled; stopped after step {step + 1}")

    return check


def is_out_of_memory(exc: BaseException) -> bool:
    """A failure that more memory would have avoided (the replica frees its cache and goes on)."""
    return isinstance(exc, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(exc).lower()


def is_device_failure(exc: BaseException) -> bool:
    """A device error after which the CUDA context cannot be trusted (an illegal address, a
    launch failure, an ECC error: CUDA reports them to every later call), unlike running out of
    memory, which the next batch survives."""
    return not is_out_of_memory(exc) and (isinstance(exc, torch.AcceleratorError) or "CUDA error" in str(exc))


@dataclass
class PendingPrompts:
    """A standard-path job's prompts (n texts) and its subject embeddings (n, Q, D), not yet
    through the text encoder: the group's are encoded in one call (Engine._encode_pending)."""

    texts: list[str]
    embeds: torch.Tensor


Conditioning = torch.Tensor | PendingPrompts  # a job's finished text-encoder states, or its pending prompts


def _encode_alone(model: BlipDiffusion, pending: PendingPrompts) -> torch.Tensor | Exception:
    """`pending`'s states, or the error its own prompts raised (out of memory is raised)."""
    try:
        return model.encode_prompts(pending.texts, pending.embeds)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        return exc


class Engine:
    """Draws Jobs with one base model. `max_subjects` registered subjects keep their
    embeddings on the device; `max_lora_adapters` LoRA subjects of rank up to `max_lora_rank`
    stay loaded in the base UNet's LoRA slots, installed here: compile the UNet after this.
    With `lora_merge`, a chunk whose rows all draw one slot draws it merged, and a chunk of
    several slots draws each row's slot merged into that row's weights (lora_slots.py)."""

    def __init__(
        self, model: BlipDiffusion, max_batch_images: int, max_subjects: int, max_lora_adapters: int, controlnet: str | None = None,
        edit: EditConfig | None = None, max_lora_rank: int = ServeConfig.model_fields["max_lora_rank"].default,
        lora_merge: bool = ServeConfig.model_fields["lora_merge"].default,
    ) -> None:
        self.model = model
        self.edit_settings = edit or EditConfig()  # prompt-to-prompt settings of edit jobs
        self.controlnet_path = controlnet  # the canny ControlNet's id or folder, loaded on the first control job
        self._controlnet: Any = None
        self.max_batch_images = max_batch_images
        self._embeds = LruBudget(max_subjects)  # subject key -> (1, Q, D) on the device
        # Rows of one UNet call: a chunk of max_batch_images with guidance doubled; an edit draws up to 4.
        self._lora = LoraSlots(model.unet, max_lora_adapters, max_lora_rank, rows=2 * max(max_batch_images, 2), merge=lora_merge)
        # With lora_merge, rows draw their slots merged into working weights (lora_slots.py).
        self.lora_merge = lora_merge
        # Rows of one slot draw the per-row mode too: the warm-up draws that mode's graphs with one subject.
        self.lora_per_row = False
        self._adapters = LruBudget(max_lora_adapters, on_evict=self._free_slot)  # subject key -> its slot (1..max_lora_adapters)
        self._full_view: BlipDiffusion | None = None  # the base's parts with a spare UNet
        self._full_key: str | None = None  # the subject whose weights the spare UNet holds
        self._spare_text_encoder: torch.nn.Module | None = None  # for subjects that trained theirs

    @property
    def adapters(self) -> list[str]:
        """Subject keys with a loaded LoRA slot, least recently used first."""
        return [str(k) for k in self._adapters.keys()]

    def run(self, jobs: list[Job]) -> list[Job]:
        """Fill each job's `images` (or `error`, for the jobs of a group that failed) in place:
        `draw`, then wait for the images (`finish_jobs`)."""
        return finish_jobs(self.draw(jobs))

    def draw(self, jobs: list[Job]) -> list[Job]:
        """Queue each group's work and return without waiting for the device: a drawn job holds
        its group's `drawn` images until `finish_jobs` (drawn.py); a job of a group that failed
        holds its `error`, an edit its images."""
        groups: dict[tuple, list[Job]] = defaultdict(list)
        for job in jobs:
            groups[job.group_key].append(job)
        for group in (part for same in groups.values() for part in _within_slots(same, self._adapters.budget)):
            try:
                self._run_group(group)
            except BatchCancelled as exc:  # nobody waits for these images; a job that failed alone keeps its error
                log.info("%s", exc)
                for job in group:
                    if job.cancelled.is_set():
                        job.images, job.error = None, exc
            except Exception as exc:  # each failure goes back to the group's callers; the replica goes on
                if is_out_of_memory(exc) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log.warning("a batch of %d request(s) failed: %s", len(group), exc)
                for job in group:
                    job.images, job.error = None, exc
        return jobs

    @torch.no_grad()
    def _run_group(self, jobs: list[Job]) -> None:
        if all_cancelled(jobs):  # they all left while an earlier group was drawn
            raise BatchCancelled(f"all {len(jobs)} request(s) of the batch were cancelled before it started")
        # Phase boundaries are marks (timings.py PhaseClock: CUDA events, no waiting), read when the
        # group's images are finished (drawn.py), so the GPU's work is charged to the phase that queued it.
        clock = PhaseClock(self.model.device)
        began = clock.mark()
        model, slot_of = self._activate(jobs)
        jobs = [job for job in jobs if job.error is None]  # a LoRA subject that cannot be loaded fails its own jobs
        if not jobs:
            return
        first = jobs[0]
        if first.edit is not None:
            with self._lora.use([slot_of.get(first.adapter_key, BASE_SLOT)], merge=self.lora_merge):  # every row of the edit's UNet calls
                first.images = [self._edit(model, first)]
            # draw_edit encodes, denoises and decodes in one call: all of it is counted as denoising.
            first.timings.update(queue=began.host - first.enqueued, condition=0.0, denoise=clock.seconds(began, clock.mark()), decode=0.0)
            return
        control = None if first.control is None else self._control(model, first)
        steps, height, width = first.request.steps, first.height, first.width
        cond, uncond, latents, scales, rows, drawn = [], [], [], [], [], []
        negatives: dict[str, torch.Tensor] = {}  # each negative prompt encoded once a group: most requests use the default
        zero_shot = self._encode_zero_shots(model, jobs)
        prepared: list[tuple[Job, Conditioning, torch.Tensor | None]] = []
        for job in jobs:
            r = job.request
            try:  # the request's own prompts and subject: a failure here is its alone, not its batch's
                parts, job_uncond = self._condition_parts(model, job, zero_shot), None
                if r.guidance_scale > 1.0:
                    negative = r.negative_prompt if r.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
                    if negative not in negatives:
                        negatives[negative] = model.encode_prompts([negative], None)  # (1, 77, D)
                    job_uncond = negatives[negative].expand(r.num_images, -1, -1)
            except Exception as exc:  # a [slot] beyond the tokens the text encoder reads (PromptError), text it cannot read
                if is_out_of_memory(exc):
                    raise
                job.images, job.error = None, exc
                continue
            prepared.append((job, parts, job_uncond))
        states = self._encode_pending(model, [parts for _, parts, _ in prepared])
        for (job, _, job_uncond), job_cond in zip(prepared, states, strict=True):
            if isinstance(job_cond, Exception):  # its prompt failed the text encoder on its own
                job.images, job.error = None, job_cond
                continue
            r = job.request
            drawn.append(job)
            cond.append(job_cond)
            if job_uncond is not None:
                uncond.append(job_uncond)
            rows += [slot_of.get(job.adapter_key, BASE_SLOT)] * r.num_images
            latents.append(model.prepare_latents(r.num_images, height, width, seed=r.seed))
            scales += [r.guidance_scale] * r.num_images
        if not drawn:
            return
        cond_all = torch.cat(cond)  # (N, 77, D)
        uncond_all = torch.cat(uncond) if uncond else None
        # Copied without waiting: a plain .to() would wait for the previous batch's work still on the GPU.
        noise = to_device_async(torch.cat(latents), model.device).to(model.unet.dtype)  # (N, C, h, w)
        # One guidance value is a Python float, as in BlipDiffusion.generate; several are a
        # (N, 1, 1, 1) tensor in the UNet's dtype, so each row is guided by its own request.
        guidance: float | torch.Tensor = scales[0] if len(set(scales)) == 1 else to_device_async(
            torch.tensor(scales, dtype=model.unet.dtype).view(-1, 1, 1, 1), model.device)
        conditioned = mark = clock.mark()
        stop_if_cancelled = stop_when_all_cancelled(drawn)
        group = DrawnGroup(drawn, began, conditioned)
        for start in range(0, len(scales), self.max_batch_images):
            stop = min(start + self.max_batch_images, len(scales))
            scheduler = fresh_scheduler(model.scheduler)
            scheduler.set_timesteps(steps)  # on the host (BlipDiffusion._denoise)
            chunk = noise[start:stop] * scheduler.init_noise_sigma
            part = guidance if isinstance(guidance, float) else guidance[start:stop]
            null = None if uncond_all is None else uncond_all[start:stop]
            # With guidance the UNet sees [uncond rows; cond rows]: both halves use the row's slot.
            # Every row is given (slot 0 too), so one graph of a compiled UNet draws any mix of subjects;
            # with lora_merge they draw their slots merged (rows of one slot: one working weight).
            with self._lora.use(rows[start:stop] * (2 if null is not None else 1), merge=self.lora_merge, per_row=self.lora_per_row):
                chunk = model._denoise(chunk, cond_all[start:stop], null, scheduler, part, progress=False,
                                       step_callback=stop_if_cancelled, control=control)
            denoised = clock.mark()
            decoded = model.vae.decode(chunk / model.vae.config.scaling_factor).sample
            mark = group.add_chunk(mark, denoised, decoded.to(torch.float32), clock)
        for job in drawn:
            job.drawn = group

    def _edit(self, model: BlipDiffusion, job: Job) -> PIL.Image.Image:
        """The edited image of an edit job: its subject's embeddings take the replaced word's place."""
        subject = job.subject
        if isinstance(subject, ZeroShotSubject | MixedSubject):
            embeds, category = self._mixed_embeds(model, subject), subject.category
        elif subject.embeds is None:
            raise SubjectUnusable(f"models:/{subject.key} is a {subject.spec.method} subject: it has no embeddings to edit with")
        else:
            embeds, category = self._device_embeds(subject), subject.spec.category
        return draw_edit(
            model, job.edit, job.request, embeds, category, job.height, job.width, self.edit_settings,
            step_callback=stop_when_all_cancelled([job]),
        )

    def _control(self, model: BlipDiffusion, job: Job) -> Any:
        """The pipeline.model.control.Control of `job`'s control request, at its size."""
        from pipeline.model.control import Control, load_controlnet

        if self._controlnet is None:
            self._controlnet = load_controlnet(self.controlnet_path, dtype=model.dtype, device=model.device, local_files_only=False)
        image = control_tensor(job.control, model.image_processor, job.height, job.width)
        return Control(self._controlnet, image, job.control.scale, start=job.control.start, end=job.control.end)

    def _condition_parts(self, model: BlipDiffusion, job: Job, zero_shot: Mapping[int, torch.Tensor]) -> Conditioning:
        """One job's text-encoder states (n, 77, D), n = num_images, or on the standard path its
        texts and subject embeddings (n, Q, D), which `_encode_pending` encodes with the group's.
        `zero_shot`: the group's zero-shot embeddings encoded together (`_encode_zero_shots`)."""
        r, subject = job.request, job.subject
        prompt = check_text(r.prompt, "prompt")
        if job.slots:
            return model.encode_slot_prompts([prompt], self._slot_embeds(model, subject), r.num_images, 1.0, DEFAULT_PROMPT_REPS)
        if isinstance(subject, ZeroShotSubject | MixedSubject):
            embeds = zero_shot.get(id(subject))
            if embeds is None:
                embeds = self._mixed_embeds(model, subject)  # (1, Q, D)
            category = subject.category
        elif subject.embeds is None:  # dreambooth: the subject is a rare token of the prompt
            from pipeline.model.subject import dreambooth_prompt

            text = dreambooth_prompt(subject.spec.identifier or "sks", subject.spec.category, prompt)
            return model.encode_prompts([check_text(text, "prompt")] * r.num_images, None)
        elif subject.spec.ti_property is not None:  # textual inversion: its word [S] in the prompt
            from pipeline.model.pseudoword import compose_prompt, encode_pseudoword_prompts

            text = compose_prompt(prompt, subject.spec.ti_property)
            return encode_pseudoword_prompts(model, [text] * r.num_images, self._device_embeds(subject))
        else:
            embeds, category = self._device_embeds(subject), subject.spec.category
        texts = [build_prompt(category, prompt, 1.0, DEFAULT_PROMPT_REPS)] * r.num_images
        return PendingPrompts(texts, embeds.expand(r.num_images, -1, -1))

    def _encode_pending(self, model: BlipDiffusion, parts: list[Conditioning]) -> list[torch.Tensor | Exception]:
        """Each job's text-encoder states, in order: finished ones as they are, and every
        PendingPrompts of the group in one call of the text encoder (eager, so one call a
        request paid its whole launch sequence each time: 8 calls for a batch of 8). When that
        call fails for any reason but memory, each is encoded alone, so a failure (an Exception
        in its place) stays its own request's."""
        pending = [part for part in parts if isinstance(part, PendingPrompts)]
        encoded: list[torch.Tensor | Exception] | None = None
        if len(pending) > 1:
            try:
                states = model.encode_prompts([t for p in pending for t in p.texts], torch.cat([p.embeds for p in pending]))
                encoded = list(states.split([len(p.texts) for p in pending]))
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                log.info("the group's prompts could not be encoded together (%s); each request encodes its own", exc)
        if encoded is None:
            encoded = [_encode_alone(model, p) for p in pending]
        queue = iter(encoded)
        return [next(queue) if isinstance(part, PendingPrompts) else part for part in parts]

    def _mixed_embeds(self, model: BlipDiffusion, subject: ZeroShotSubject | MixedSubject) -> torch.Tensor:
        """Subject embeddings (1, Q, D) of a zero-shot subject, or the weighted mix of a MixedSubject's."""
        from pipeline.model.blip_diffusion import mix_subjects

        if isinstance(subject, ZeroShotSubject):
            return model.encode_subject(list(subject.images), subject.category)
        parts = [self._mixed_embeds(model, part) if isinstance(part, ZeroShotSubject) else self._device_embeds(part)
                 for part in subject.parts]
        return mix_subjects(parts, subject.weights)

    def _encode_zero_shots(self, model: BlipDiffusion, jobs: list[Job]) -> dict[int, torch.Tensor]:
        """{id(subject): embeddings (1, Q, D)} of the group's zero-shot requests (two or more),
        every reference photo through the ViT and Q-Former in one call: one call a request paid
        the encoders' whole launch sequence each time (a batch of 8 zero-shot requests, 8 calls).
        Each subject's embeddings are the mean over its own photos (`encode_subjects`). {} when the call fails for any reason but memory: each request then encodes its
        own photos, so a failure stays its own."""
        subjects = [job.subject for job in jobs if isinstance(job.subject, ZeroShotSubject)]
        if len(subjects) < 2:
            return {}
        try:
            embeds = model.encode_subjects([(list(subject.images), subject.category) for subject in subjects])
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            log.info("the group's zero-shot photos could not be encoded together (%s); each request encodes its own", exc)
            return {}
        return {id(subject): embed for subject, embed in zip(subjects, embeds, strict=True)}

    def _slot_embeds(self, model: BlipDiffusion, subject: Any) -> dict[str, torch.Tensor]:
        """{slot name: subject embeddings (1, Q, D)}: the subjects of each category mixed by their weights."""
        from pipeline.model.blip_diffusion import mix_subjects

        groups: dict[str, list[tuple[torch.Tensor, float]]] = defaultdict(list)
        for part in slot_parts(subject):
            embeds = self._mixed_embeds(model, part.subject) if isinstance(part.subject, ZeroShotSubject) else self._device_embeds(part.subject)
            groups[part.category].append((embeds, part.weight))
        return {name: mix_subjects([e for e, _ in group], [w for _, w in group]) for name, group in groups.items()}

    def _device_embeds(self, subject: RegisteredSubject) -> torch.Tensor:
        embeds = self._embeds.get(subject.key)
        if embeds is None:
            embeds = to_device_async(subject.embeds, self.model.device)  # a subject's first batch does not wait for the last
            self._embeds.put(subject.key, embeds)
        return embeds

    # -----------------------------------------------------------------------------------------
    # Which UNet draws a group

    def _activate(self, jobs: list[Job]) -> tuple[BlipDiffusion, dict[str, int]]:
        """The model that draws the group `jobs`, and the LoRA slot of each LoRA subject in it,
        loaded now if it is not yet. A job whose subject cannot be loaded gets its error here."""
        if jobs[0].unet_key[0] == "full":
            return self._full_model(jobs[0].subject), {}
        subjects = {job.adapter_key: job.subject for job in jobs if job.adapter_key is not None}
        if len(subjects) > self._adapters.budget:
            raise SubjectUnusable(f"{len(subjects)} LoRA subjects in one batch; serve.max_lora_adapters is {self._adapters.budget:g}")
        # The loaded ones first, each now recently used, so loading the others evicts none this group needs.
        slots = {key: self._adapters.get(key) for key in subjects}
        for key, slot in slots.items():
            if slot is None:
                try:
                    slots[key] = self._load_lora(subjects[key])
                except SubjectUnusable as exc:
                    for job in jobs:
                        if job.adapter_key == key:
                            job.images, job.error = None, exc
        return self.model, {key: slot for key, slot in slots.items() if slot is not None}

    def _load_lora(self, subject: RegisteredSubject) -> int:
        """Copy `subject`'s LoRA into a free slot of the base UNet (evicting the least recently
        used subject's when all are taken); returns the slot. SubjectUnusable when it does not fit."""
        rank = subject.spec.lora_rank or 4
        try:
            weights = self._lora.fit(subject.lora, rank)  # checked before anything is evicted
        except LoraUnfit as exc:
            raise SubjectUnusable(f"models:/{subject.key}: {exc}") from None
        self._adapters.make_room()
        slot = self._lora.load(weights, (subject.spec.lora_alpha or rank) / rank)  # peft's scaling, lora_alpha / r
        self._adapters.put(subject.key, slot)
        return slot

    def _free_slot(self, key: Any, slot: int) -> None:
        self._lora.free(slot)
        log.info("dropped the LoRA slot of models:/%s (serve.max_lora_adapters)", key)

    def _full_model(self, subject: RegisteredSubject) -> BlipDiffusion:
        """The base's parts around a spare UNet (and text encoder) holding `subject`'s weights."""
        import copy

        from diffusers import UNet2DConditionModel

        base = self.model
        if self._full_view is None:
            spare = UNet2DConditionModel.from_config(base.unet.config).to(device=base.device, dtype=base.dtype).eval()
            self._full_view = BlipDiffusion(base.qformer, base.text_encoder, spare, base.vae, base.scheduler, base.tokenizer,
                                            base.qformer_tokenizer, base.image_processor, base.model_index)
        view = self._full_view
        if self._full_key != subject.key:
            self._full_key = None  # half-loaded weights must never be taken for a subject's
            view.unet.load_state_dict(subject.unet)
            if subject.text_encoder is not None:
                if self._spare_text_encoder is None:
                    self._spare_text_encoder = copy.deepcopy(base.text_encoder)
                self._spare_text_encoder.load_state_dict(subject.text_encoder)
                view.text_encoder = self._spare_text_encoder
            else:
                view.text_encoder = base.text_encoder
            self._full_key = subject.key
        return view


def _within_slots(group: list[Job], slots: int) -> list[list[Job]]:
    """`group` in parts of at most `slots` distinct LoRA subjects each, in order: every subject
    of a part holds a slot while the part is drawn (the batcher may put more subjects in one
    batch than serve.max_lora_adapters holds; that is no fault of the requests)."""
    parts: list[list[Job]] = [[]]
    subjects: set[str] = set()
    for job in group:
        key = job.adapter_key
        if key is not None and key not in subjects and len(subjects) == slots:
            parts.append([])
            subjects = set()
        parts[-1].append(job)
        if key is not None:
            subjects.add(key)
    return parts
