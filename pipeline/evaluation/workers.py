"""The two Ray Data actors of the evaluation job: one generates images, one scores them.

Each loads its models once in `__init__` and maps a batch in `__call__`; resources are declared
in pipeline/evaluation/plan.py. Batches are dicts of numpy arrays (Ray Data's default format).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from pipeline.evaluation.benchmark import CLASS_FIELD
from pipeline.evaluation.features import ClipFeatures, DinoFeatures
from pipeline.evaluation.metrics import image_similarity, text_similarity
from pipeline.model.image_processing import ImageError, read_rgb

log = logging.getLogger(__name__)

# Row columns.
SUBJECT_ID = "subject_id"
CATEGORY = "category"
PROMPT = "prompt"
TEMPLATE = "template"  # the prompt as listed, with {class}
INDICES = "indices"  # generation rows: the image indices of the prompt still to make
PATHS = "paths"  # generation rows: where they go, relative to the output folder
INDEX = "index"
PATH = "path"


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def split_prompt(prompt: str) -> tuple[str, str]:
    """A DreamBench prompt as BLIP-Diffusion's `generate(prompt, target_category=...)` takes it.

    The model writes "a {target_category} {prompt}" and puts the subject right after "a", so
    "a dog in the jungle" -> ("dog", "in the jungle") and "a red dog" -> ("red", "dog"): the
    text it encodes is the benchmark's prompt exactly, with the subject where DreamBench's
    unique token stands ("a [V] dog in the jungle").
    """
    words = prompt.split()
    if len(words) < 3 or words[0] != "a":
        raise ValueError(f"a prompt must read 'a <at least two words>', got {prompt!r}")
    return words[1], " ".join(words[2:])


def save_png_atomic(image: PIL.Image.Image, path: Path) -> None:
    """Write `path` so that it exists only once complete (a killed run leaves no half PNG, so
    its presence marks the image done)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def load_rgb(path: str | Path) -> PIL.Image.Image:
    """A photo as RGB, decoded as generate reads its references (image_processing.read_rgb:
    upright by its EXIF orientation, 16-bit scaled to 8); PIL's own convert("RGB") clipped a
    16-bit PNG to white and left a turned photo on its side. ImageError naming it otherwise."""
    return read_rgb(path, ImageError, "photo")


def draw_prompt(
    model: Any, embeds: torch.Tensor | None, identifier: str | None, category: str, prompt: str, template: str,
    seeds: list[int], settings: dict[str, Any], learned_word: str | None = None,
) -> list[PIL.Image.Image]:
    """One image per seed of a subject in a DreamBench prompt, as the benchmark scores it: the
    subject embeddings (1, Q, D) where the prompt names the subject ("a [subject] dog in the
    jungle"), or, with none (DreamBooth), the rare token there ("a sks dog in the jungle").
    Image k starts from the noise of seeds[k] (drawn on the CPU), so an image does not depend on
    the others made with it. settings: steps, guidance_scale, negative_prompt, height, width and
    batch_size (None = all at once). A textual inversion (`learned_word`: its subject.json's
    ti_property) is its word [S] in place of the class noun ("a [S] in the jungle"), `embeds`
    (1, V, D) its vectors. The training loop's validation draws through here too."""
    shared = {key: settings[key] for key in ("steps", "guidance_scale", "negative_prompt", "height", "width")}
    if learned_word is not None:
        from pipeline.model.pseudoword import PLACEHOLDER
        from pipeline.model.subject import generate_from_text

        text = template.replace(CLASS_FIELD, PLACEHOLDER)
        return [generate_from_text(model, [text], num_images=1, seed=seed, learned_word=embeds, **shared)[0] for seed in seeds]
    if embeds is None:  # DreamBooth: the subject is a word, one image per seed
        from pipeline.model.subject import generate_from_text

        text = template.replace(CLASS_FIELD, f"{identifier or 'sks'} {category}")
        return [generate_from_text(model, [text], num_images=1, seed=seed, **shared)[0] for seed in seeds]
    head, tail = split_prompt(prompt)
    latents = torch.cat([model.prepare_latents(1, settings["height"], settings["width"], seed=seed) for seed in seeds])
    return model.generate(
        tail, subject_embeds=embeds, target_category=head, num_images=len(seeds), latents=latents,
        batch_size=settings.get("batch_size"), progress=False, **shared,
    )


class ImageGenerator:
    """Ray Data actor: BLIP-Diffusion. One row per (subject, prompt) with the image indices to
    make; writes each as a PNG under `out_dir` and returns one row per image.

    Image k of a prompt starts from the noise of seed `seed + k` (drawn on the CPU), so an image
    is the same whether it is made alone on a resumed run or with its siblings. Zero-shot, the
    subject embedding is the mean over the subject's real photos, computed once per actor. With
    a fine-tuned subject (`subject_folder`, pipeline/model/subject.py) applied to the base at
    `model_path`, it is the subject's learned embedding; a DreamBooth subject has none and is
    drawn from text alone, its rare token where DreamBench's stands ("a sks dog in the jungle").
    """

    def __init__(
        self,
        model_path: str,
        out_dir: str,
        subject_photos: dict[str, list[str]],
        settings: dict[str, Any],
        qformer_tokenizer: str | None = None,
        subject_folder: str | None = None,
    ) -> None:
        from pipeline.model import BlipDiffusion

        self.device = pick_device()
        dtype = settings["dtype"]
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        # Loaded in float32 on the CPU first, so a subject's tensors apply to the weights they were saved from.
        model = BlipDiffusion.from_pretrained(model_path, qformer_tokenizer=qformer_tokenizer)
        self.spec = None
        self._subjects: dict[str, torch.Tensor | None] = {}  # subject_id -> (1, Q, D) embedding
        if subject_folder is not None:
            from pipeline.model.subject import apply_subject

            self.spec, embeds = apply_subject(model, Path(subject_folder))
            self._subjects[self.spec.subject_id] = embeds
        self.model = model.to(device=self.device, dtype=getattr(torch, dtype)).eval()
        self.out_dir = Path(out_dir)
        self.subject_photos = subject_photos
        self.settings = settings
        self.controlnet = None  # with settings["control"]: the ControlNet every image is steered by
        if settings.get("control"):
            from pipeline.model.control import load_controlnet

            self.controlnet = load_controlnet(
                settings["control"]["controlnet"], dtype=self.model.dtype, device=self.device, local_files_only=False
            )
        log.info("BLIP-Diffusion %s%s on %s (%s)", model_path, f" + subject {subject_folder}" if subject_folder else "", self.device, dtype)

    def _subject(self, subject_id: str, category: str) -> torch.Tensor | None:
        if subject_id not in self._subjects:
            self._subjects[subject_id] = self.model.encode_subject(self.subject_photos[subject_id], category)
        return self._subjects[subject_id]

    def _generate(self, subject_id: str, category: str, prompt: str, template: str, indices: list[int]) -> list[PIL.Image.Image]:
        identifier = self.spec.identifier if self.spec is not None else None
        learned_word = self.spec.ti_property if self.spec is not None and self.spec.subject_id == subject_id else None
        seeds = [self.settings["seed"] + k for k in indices]
        if self.controlnet is not None:
            return self._generate_controlled(subject_id, category, prompt, indices)
        return draw_prompt(
            self.model, self._subject(subject_id, category), identifier, category, prompt, template, seeds, self.settings, learned_word
        )

    def _generate_controlled(self, subject_id: str, category: str, prompt: str, indices: list[int]) -> list[PIL.Image.Image]:
        """Image k of the prompt steered by the Canny map of the subject's real photo k (cycling
        through them), from the noise of seed + k as the plain images."""
        from pipeline.model.control import Control, make_control_map, prepare_control_image

        settings, control = self.settings, self.settings["control"]
        shared = {key: settings[key] for key in ("steps", "guidance_scale", "negative_prompt", "height", "width")}
        photos = self.subject_photos[subject_id]
        head, tail = split_prompt(prompt)
        images = []
        for k in indices:
            edges = make_control_map("canny", load_rgb(photos[k % len(photos)]), shared["height"], shared["width"],
                                     canny_low=control["canny_low"], canny_high=control["canny_high"])
            image = prepare_control_image(edges, self.model.image_processor, shared["height"], shared["width"])
            steer = Control(self.controlnet, image, control["scale"], **control.get("window", {}))
            images += self.model.generate(
                tail, subject_embeds=self._subject(subject_id, category), target_category=head, num_images=1,
                seed=settings["seed"] + k, progress=False, control=steer, **shared,
            )
        return images

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {SUBJECT_ID: [], PATH: []}
        for subject_id, category, prompt, template, indices, paths in zip(
            batch[SUBJECT_ID], batch[CATEGORY], batch[PROMPT], batch[TEMPLATE], batch[INDICES], batch[PATHS], strict=True
        ):
            images = self._generate(str(subject_id), str(category), str(prompt), str(template), [int(k) for k in indices])
            for image, path in zip(images, paths, strict=True):
                save_png_atomic(image, self.out_dir / str(path))
                out[SUBJECT_ID].append(str(subject_id))
                out[PATH].append(str(path))
        return {key: np.asarray(values, dtype=object) for key, values in out.items()}


class ImageScorer:
    """Ray Data actor: DINO and CLIP loaded once; adds `dino`, `clip_i` and `clip_t` (float64 in
    [-1, 1]) to rows of generated images (subject_id, prompt, path).

    The real photos' features are computed once per subject and the prompts' once per text.
    """

    def __init__(self, dino_path: str, clip_path: str, out_dir: str, subject_photos: dict[str, list[str]], batch_size: int = 32) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars are noise in job logs
        self.device = pick_device()
        self.dino = DinoFeatures(dino_path, self.device, batch_size)
        self.clip = ClipFeatures(clip_path, self.device, batch_size)
        self.out_dir = Path(out_dir)
        self.subject_photos = subject_photos
        self._real: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # subject_id -> DINO (M, D), CLIP (M, P)
        self._texts: dict[str, torch.Tensor] = {}  # prompt -> CLIP (P,)

    def _real_features(self, subject_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        if subject_id not in self._real:
            photos = [load_rgb(p) for p in self.subject_photos[subject_id]]
            self._real[subject_id] = (self.dino.encode_images(photos), self.clip.encode_images(photos))
        return self._real[subject_id]

    def _text_features(self, prompts: list[str]) -> torch.Tensor:
        new = sorted({p for p in prompts if p not in self._texts})
        if new:
            self._texts.update(zip(new, self.clip.encode_texts(new), strict=True))
        return torch.stack([self._texts[p] for p in prompts])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        subjects = [str(s) for s in batch[SUBJECT_ID]]
        images = [load_rgb(self.out_dir / str(p)) for p in batch[PATH]]
        dino_gen, clip_gen = self.dino.encode_images(images), self.clip.encode_images(images)  # (B, D), (B, P)
        dino, clip_i = np.empty(len(images)), np.empty(len(images))
        for i, subject in enumerate(subjects):
            dino_real, clip_real = self._real_features(subject)
            dino[i] = float(image_similarity(dino_gen[i : i + 1], dino_real)[0])
            clip_i[i] = float(image_similarity(clip_gen[i : i + 1], clip_real)[0])
        clip_t = text_similarity(clip_gen, self._text_features([str(p) for p in batch[PROMPT]])).numpy()
        return {**batch, "dino": dino, "clip_i": clip_i, "clip_t": clip_t}
