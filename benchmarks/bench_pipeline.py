"""Whole `data build` throughput on one node: photos/s end to end, and Ray Data's per-stage stats.

The build runs `pipeline.data.build.build_dataset`, which is what `subjectforge data build` calls, on a
source of --photos photos. They are DreamBench-mini's 40 JPEGs, each copy jittered (crop, flip,
brightness) so that no two files are the same bytes. CLIPSeg is real-sized: the
CIDAS/clipseg-rd64-refined architecture (ViT-B/16 vision tower, CLIP text tower, rd64 decoder,
352 px processor) with random weights, saved in the official layout. Its random weights make
timings real, not masks: its maps are speckle, which leaves 0.15% of a photo unknown, so matting
would cost nearly nothing. With `--trimaps prior` (the default) the CLIPSeg actor still runs the
model on every photo, then replaces each map by a subject-shaped one
(`tests.matting_fixtures.subject_confidence`, seeded by the photo's hash) before the trimap
stage's real defaults (0.5 / 0.2, eroded 3 / 6 px): 17-36% of each photo unknown, the matting
load of real subjects. `--trimaps clipseg` keeps the speckle, with the tiny profile's trimap
settings (per-photo min-max scaling, no erosion) so that all three regions stay in every photo.

A warm-up build of --warm-up-photos photos goes first (64: one batch of the matte actor). It
fills the page cache with CLIPSeg's weights and torch.compile's caches with the matting kernels:
Inductor's FX graph and autograd caches and Triton's kernels, on disk, in folders every process
of the user shares (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR; exported before Ray starts so the
workers use the folders the report counts). A long-running node keeps them between builds. The
timed build starts fresh actors, whose compile loads those caches; the report counts the cache
files each build added (none: nothing was compiled anew).

What each timed build reports (`builds` in the JSON):
- end to end: photos over the driver's clock from the start of the plan to the last row
  written (`end_to_end_photos_per_s`), and over the whole `data build` (scan, hashing, plan,
  ledger, manifest: `build_photos_per_s`);
- while rows flow: the rows written after the first shard, over the time from the first shard
  to the last (`steady_photos_per_s`), and between 10% and 90% of the rows written. Shards are
  timed as they land: a thread polls the staging folder for finished Parquet files;
- actor start, from Ray's task events (`ray.timeline()`): each actor's constructor (CLIPSeg
  load; the matte actor's compile) and its first batch, in seconds from the plan's start, and
  each operator's tasks, busy seconds and mean and peak number of tasks running at once;
- per operator, Ray Data's Dataset.stats(): tasks, task wall and CPU time, rows/s.

The captioner (`--captioner`, the caption stage's actors after CLIPSeg) is by default
Salesforce/blip2-opt-2.7b's architecture (ViT-g/14, a 32-query Q-Former, OPT-2.7B) with random
weights, saved in the official layout, loaded in float16 as the real one is. Its tokenizer is
the tiny captioner's byte-level one (a 165-token vocabulary, so its LM head is 2560 x 165, not
2560 x 50272: about 5% of OPT-2.7B's per-token work less), and random weights never write the
end of a caption: every photo gets data.caption.max_new_tokens tokens (30 by default, where real
BLIP-2 captions end after 10-15): an upper bound on the stage's cost; add `--variant
"data.caption.max_new_tokens=12"` for a realistic one. `--captioner off` builds without
captions, the plan before the caption stage. `--captioner random-blip-large` /
`random-blip-base` is Salesforce/blip-image-captioning-large's / -base's architecture (ViT-L/16
or ViT-B/16 at 384 px, a BERT-base text decoder) with random weights in float16, saved in the
official layout with a BERT WordPiece tokenizer of the real vocabulary's size (30,524 with [DEC]
and [ENC]), so its LM head costs what the real one does. A variant's `captioner=SETTING` (any
--captioner setting) swaps the captioner for that build: every captioner is made before the
warm-up. Each build reports the caption stage's photos/s per actor and every stage's share of
the summed stage time (`caption`). The people filter's CLIPSeg prompt ("person") runs on every
photo, but with `data.filter.exclude_area` 1.0, so that the random model's maps reject nothing.

The JSON is rewritten every 2 s while a build runs, after each build, on SIGTERM (`timeout`),
and at --budget seconds, where the script stops with status 3. A variant is not started when
the previous build took longer than the budget has left.

    python benchmarks/bench_pipeline.py --out $OUT/bench_pipeline.json --budget 420   # GPU machine
    python benchmarks/bench_pipeline.py --smoke --out /tmp/bench_pipeline.json   # CPU sanity of the script, captions on
    python benchmarks/bench_pipeline.py --pool 4096 --variant "" --variant "data.backgrounds.folder={pool}" \
        --out $OUT/pool.json   # the bundled 12 backgrounds against a pool of 4,096 (a real run's)
    python benchmarks/bench_pipeline.py --photos 48 --warm-up-photos 8 --size 96 \\
        --clipseg tiny --num-cpus 4 --fake-gpus 1 data.matte.backend=torch \\
        data.matte.num_actors=1 data.segment.num_actors=1 data.caption.num_actors=1 data.matte.batch_size=8   # CPU-only sanity (4 CPUs: each actor holds one)
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import describe  # noqa: E402

import pipeline.data.build as build  # noqa: E402
import pipeline.data.plan as dataplan  # noqa: E402
from pipeline.config import ASSETS_DIR, load_config  # noqa: E402
from pipeline.data.plan import SegmentAndTrimap  # noqa: E402
from stages.records import CONFIDENCE, SOURCE_SHA256, healthy_rows  # noqa: E402
from stages.trimap import trimap_batch  # noqa: E402
from tests.matting_fixtures import subject_confidence  # noqa: E402

PHOTOS = REPO / "datasets" / "dreambench-mini"
TINY_CLIPSEG = ASSETS_DIR / "tiny-clipseg"
TINY_CAPTIONER = ASSETS_DIR / "tiny-captioner"

log = logging.getLogger("bench_pipeline")


def make_random_blip2(out: Path) -> Path:
    """Salesforce/blip2-opt-2.7b's architecture with random weights in float16, written by
    save_pretrained with a Blip2Processor (224 px, 32 query tokens) around the tiny captioner's
    tokenizer (see the module docstring): 3.8B parameters. Kept in `out`, and reused when it is
    there."""
    from transformers import AutoProcessor, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    if is_saved(out):
        return out
    tiny = AutoProcessor.from_pretrained(TINY_CAPTIONER)
    tokenizer = tiny.tokenizer
    queries = 32
    processor = Blip2Processor(image_processor=blip_image_processor(224), tokenizer=tokenizer, num_query_tokens=queries)
    config = Blip2Config(
        vision_config={  # EVA ViT-g/14
            "hidden_size": 1408, "intermediate_size": 6144, "num_hidden_layers": 39, "num_attention_heads": 16,
            "image_size": 224, "patch_size": 14, "qkv_bias": True,
        },
        qformer_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                        "cross_attention_frequency": 2, "encoder_hidden_size": 1408},
        text_config={  # OPT-2.7B
            "model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 2560, "ffn_dim": 10240,
            "num_hidden_layers": 32, "num_attention_heads": 32, "word_embed_proj_dim": 2560,
            "max_position_embeddings": 2048, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1,
        },
        num_query_tokens=queries,
    )  # fmt: skip
    config.image_token_index = tokenizer.convert_tokens_to_ids(str(processor.image_token))
    return save_random(Blip2ForConditionalGeneration, config, processor, out, "BLIP-2 OPT-2.7B")


def blip_image_processor(side: int):
    """BLIP's and BLIP-2's image processor as released: a fixed-size bicubic resize to `side` px
    and CLIP's statistics."""
    from transformers import BlipImageProcessor

    return BlipImageProcessor(
        size={"height": side, "width": side}, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )  # fmt: skip


def is_saved(out: Path) -> bool:
    """Whether `save_random` finished writing a model to `out` (in one file or in shards): its
    processor is written last."""
    weights = (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()
    return weights and (out / "processor_config.json").exists()


def save_random(model_class, config, processor, out: Path, name: str, dtype: torch.dtype = torch.float16) -> Path:
    """A model of `config` with seeded random weights in `dtype`, written with its processor by
    save_pretrained. Made on the GPU when there is one: billions of parameters take minutes to
    initialise on a CPU."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = model_class(config).to(dtype).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("random %s: %.1fM parameters at %s", name, sum(p.numel() for p in model.parameters()) / 1e6, out)
    del model
    torch.cuda.empty_cache()
    return out


# Salesforce/blip-image-captioning-large and -base (their config.json): a ViT over 16 px patches
# of 384 px photos, and a BERT-base text decoder cross-attending to it.
BLIP_VISION = {
    "large": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
    "base": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
}
BLIP_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
BERT_VOCAB = 30522  # bert-base-uncased; BLIP adds [DEC] and [ENC]: 30524


def write_bert_vocab(out: Path, size: int) -> Path:
    """A WordPiece vocab.txt of `size` tokens: bert-base-uncased's special tokens at its ids
    ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103), letters, digits and the tiny
    captioner's words with their continuations, then numbered filler words."""
    from pipeline.tiny_models import CAPTION_WORDS

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = list(dict.fromkeys([*head, *chars, *CAPTION_WORDS, *(f"##{c}" for c in chars)]))
    if size < len(tokens):
        raise ValueError(f"a BERT vocab needs at least {len(tokens)} tokens, not {size}")
    tokens += [f"w{i}" for i in range(size - len(tokens))]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(tokens) + "\n")
    return out / "vocab.txt"


def make_random_blip(
    out: Path, vision: dict[str, int], text: dict[str, int] = BLIP_TEXT, side: int = 384, vocab: int = BERT_VOCAB
) -> Path:
    """A BlipForConditionalGeneration captioner in Salesforce/blip-image-captioning-*'s layout
    with random weights in float16: `vision` and `text` sizes (BLIP_VISION, BLIP_TEXT), `side` px
    photos, and a BlipProcessor whose BertTokenizer has `vocab` WordPiece tokens plus BLIP's
    [DEC] (the decoder's bos) and [ENC], as BLIP's init_tokenizer adds them. Kept in `out`, and
    reused when it is there."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    if is_saved(out):
        return out
    tokenizer = BertTokenizer(str(write_bert_vocab(out, vocab)), do_lower_case=True, model_max_length=512)
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    ids = tokenizer.convert_tokens_to_ids
    config = BlipConfig(
        # initializer_range as released: BlipVisionConfig's default (1e-10) is all zeros in float16.
        vision_config={**vision, "image_size": side, "patch_size": 16, "initializer_range": 0.02},
        text_config={
            **text, "vocab_size": len(tokenizer), "encoder_hidden_size": vision["hidden_size"],
            "max_position_embeddings": 512,
            "bos_token_id": ids("[DEC]"), "pad_token_id": ids("[PAD]"), "sep_token_id": ids("[SEP]"),
        },
    )  # fmt: skip
    processor = BlipProcessor(image_processor=blip_image_processor(side), tokenizer=tokenizer)
    return save_random(BlipForConditionalGeneration, config, processor, out, f"BLIP ViT {vision['hidden_size']} wide")


def captioner_overrides(setting: str, work: Path) -> list[str]:
    """--captioner as config overrides: off, a random BLIP-2 or BLIP (built in `work`), tiny, or a path."""
    if setting == "off":
        return ["data.caption.enabled=false"]
    if setting == "random-blip2":
        return [f"models.captioner={make_random_blip2(work / 'blip2-opt-2.7b-random')}"]
    if setting in ("random-blip-large", "random-blip-base"):
        size = setting.rsplit("-", 1)[1]
        return [f"models.captioner={make_random_blip(work / f'blip-captioning-{size}-random', BLIP_VISION[size])}"]
    return [f"models.captioner={TINY_CAPTIONER if setting == 'tiny' else setting}"]


def variant_overrides(variant: str, work: Path) -> list[str]:
    """A --variant's config overrides, its `captioner=SETTING` (a --captioner setting) made into
    captioner_overrides and `{pool}` into --pool's folder."""
    overrides: list[str] = []
    for item in variant.replace("{pool}", str(work / POOL)).split():
        key, _, value = item.partition("=")
        overrides += captioner_overrides(value, work) if key == "captioner" else [item]
    return overrides


def stage_shares(stage_seconds: dict[str, float], photos_captioned: int) -> dict[str, Any]:
    """Each stage's share of the summed stage seconds (the manifest's, summed over photos), and
    the caption stage's photos/s per actor (photos over its actors' summed batch time)."""
    total = sum(v for k, v in stage_seconds.items() if k != "scan") or 1.0
    caption = stage_seconds.get("caption", 0.0)
    return {
        "share": {k: round(v / total, 4) for k, v in stage_seconds.items() if k != "scan"},
        "caption_photos": photos_captioned,
        "caption_photos_per_s_per_actor": round(photos_captioned / caption, 2) if caption else None,
    }


def make_random_clipseg(out: Path) -> Path:
    """CIDAS/clipseg-rd64-refined's architecture and processor with random weights, written by
    save_pretrained (config.json, model.safetensors, processor and tokenizer files). The
    tokenizer is the tiny checkpoint's byte-level one: prompts are a few tokens either way."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
    )

    from pipeline.tiny_models import clipseg_image_processor

    config = CLIPSegConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
        },
        vision_config={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        projection_dim=512,
        extract_layers=[3, 6, 9],
        reduce_dim=64,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=2048,
        conditional_layer=0,
        use_complex_transposed_convolution=True,  # the "refined" decoder
    )
    torch.manual_seed(0)
    model = CLIPSegForImageSegmentation(config).eval()
    model.save_pretrained(out)
    image_processor = clipseg_image_processor(352)
    tokenizer = CLIPTokenizer(str(TINY_CLIPSEG / "vocab.json"), str(TINY_CLIPSEG / "merges.txt"))
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    log.info(
        "random CLIPSeg rd64-refined: %.1fM parameters at %s", sum(p.numel() for p in model.parameters()) / 1e6, out
    )
    return out


class PriorSegmentAndTrimap(SegmentAndTrimap):
    """The plan's CLIPSeg actor, with each confidence map replaced by a subject-shaped one after
    the model has run (see the module docstring). Defined here, it travels to the workers by
    value; its base class is imported there."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = super(SegmentAndTrimap, self).__call__(batch)  # CLIPSeg alone, at full cost
        maps = list(batch[CONFIDENCE])
        for i in healthy_rows(batch):
            height, width = maps[i].shape
            maps[i] = subject_confidence(height, width, int(str(batch[SOURCE_SHA256][i])[:12], 16))
        batch[CONFIDENCE] = np.empty(len(maps), dtype=object)
        batch[CONFIDENCE][:] = maps
        return trimap_batch(batch, device=self.device, **self.trimap_args)


def with_prior_trimaps(build_plan):
    """`build_dataset_plan` with `PriorSegmentAndTrimap` as the CLIPSeg actor. The plan builder
    looks the class up when it builds the (lazy) plan; the module keeps its own class the rest
    of the time, so that Ray pickles that one by reference and the bench's subclass by value."""

    def build_plan_with_prior(*args: Any, **kwargs: Any):
        dataplan.SegmentAndTrimap = PriorSegmentAndTrimap
        try:
            return build_plan(*args, **kwargs)
        finally:
            dataplan.SegmentAndTrimap = SegmentAndTrimap

    return build_plan_with_prior


def _jittered_copy(task: tuple[str, str, int, int]) -> None:
    """One source photo -> a jittered JPEG of `size` px (crop 85-100%, flip, brightness +-10%)."""
    src, dst, size, seed = task
    rng = np.random.default_rng(seed)
    photo = Image.open(src).convert("RGB")
    w, h = photo.size
    scale = rng.uniform(0.85, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    photo = photo.crop((x, y, x + cw, y + ch)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        photo = photo.transpose(Image.FLIP_LEFT_RIGHT)
    photo = ImageEnhance.Brightness(photo).enhance(rng.uniform(0.9, 1.1))
    photo.save(dst, quality=92)


def make_source(root: Path, photos: int, size: int, workers: int) -> Path:
    """A source folder (subjects.csv + one folder per subject) of `photos` jittered copies of
    DreamBench-mini, cycling its photos."""
    files = sorted(PHOTOS.glob("*/*.jpg"))
    root.mkdir(parents=True)
    shutil.copy(PHOTOS / "subjects.csv", root / "subjects.csv")
    tasks = []
    for i in range(photos):
        src = files[i % len(files)]
        (root / src.parent.name).mkdir(exist_ok=True)
        tasks.append((str(src), str(root / src.parent.name / f"{i:06d}.jpg"), size, i))
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_jittered_copy, tasks, chunksize=16)
    return root


# --pool's folder under the work folder, which a variant names as {pool}.
POOL = "background-pool"


def make_pool(root: Path, backgrounds: int, size: int, workers: int) -> Path:
    """A folder of `backgrounds` distinct background photos (jittered copies of DreamBench-mini's
    photos, seeded apart from the source's), as a real pool of thousands is: nearly every
    composite draws one its actor has not decoded yet."""
    files = sorted(PHOTOS.glob("*/*.jpg"))
    root.mkdir(parents=True)
    tasks = [(str(files[i % len(files)]), str(root / f"bg{i:06d}.jpg"), size, 10**9 + i) for i in range(backgrounds)]
    with mp.get_context("spawn").Pool(workers) as pool:
        pool.map(_jittered_copy, tasks, chunksize=16)
    return root


class Report:
    """The JSON results, rewritten (atomically) whenever something is added, so that a run cut
    short by a time limit still leaves what it measured."""

    def __init__(self, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = {}
        self._lock = threading.Lock()

    def save(self) -> None:
        if self.path is None:
            return
        with self._lock:
            for _ in range(5):  # another thread may be adding to the report right now
                try:
                    text = json.dumps(self.data, indent=2, default=str)
                    break
                except RuntimeError:
                    time.sleep(0.05)
            else:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, self.path)


class ShardWatch(threading.Thread):
    """Times written rows from the driver: polls the build's staging folder for data shards whose
    Parquet footer is written (each write task closes its shard when done), without touching
    the stages. `shards` holds (seconds since the plan started, rows) per finished shard."""

    def __init__(self, data_dir: Path, started: float, on_progress, interval: float = 0.2, report_every: float = 2.0):
        super().__init__(daemon=True)
        self.data_dir, self.started, self.on_progress = data_dir, started, on_progress
        self.interval, self.report_every = interval, report_every
        self.shards: list[tuple[float, int]] = []
        self._seen: set[str] = set()
        self._done = threading.Event()

    def scan(self) -> None:
        import pyarrow.parquet as pq

        if not self.data_dir.is_dir():
            return
        for path in sorted(self.data_dir.glob("*.parquet")):
            if path.name in self._seen:
                continue
            try:
                rows = pq.read_metadata(path).num_rows
            except (OSError, ValueError):  # still being written (no footer yet)
                continue
            self._seen.add(path.name)
            self.shards.append((time.perf_counter() - self.started, rows))

    def run(self) -> None:
        last_report = 0.0
        while not self._done.wait(self.interval):
            self.scan()
            if time.perf_counter() - last_report >= self.report_every:
                last_report = time.perf_counter()
                self.on_progress()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.scan()


def written_rates(shards: list[tuple[float, int]], per_photo: int) -> dict[str, Any]:
    """From (time, rows) of each finished shard: when the first rows landed, and the rate while
    rows flow. `steady` counts the rows after the first shard over the span from the first
    shard to the last (the pipeline is full and draining); `p10_p90` the rows between the
    moments 10% and 90% of them were written, which leaves out the start and the tail."""
    if not shards:
        return {"shards": 0}
    shards = sorted(shards)
    times = np.array([t for t, _ in shards])
    cumulative = np.cumsum([rows for _, rows in shards])
    total = int(cumulative[-1])
    out: dict[str, Any] = {
        "shards": len(shards),
        "rows": total,
        "first_rows_s": round(float(times[0]), 3),
        "last_rows_s": round(float(times[-1]), 3),
        "curve": [[round(float(t), 2), int(c)] for t, c in zip(times, cumulative, strict=True)],
    }
    if times[-1] > times[0]:
        rows_per_s = (total - cumulative[0]) / (times[-1] - times[0])
        out["steady_rows_per_s"] = round(float(rows_per_s), 2)
        out["steady_photos_per_s"] = round(float(rows_per_s) / per_photo, 2)
    i10, i90 = int(np.searchsorted(cumulative, 0.1 * total)), int(np.searchsorted(cumulative, 0.9 * total))
    if times[i90] > times[i10]:
        rows_per_s = (cumulative[i90] - cumulative[i10]) / (times[i90] - times[i10])
        out["p10_p90_photos_per_s"] = round(float(rows_per_s) / per_photo, 2)
    return out


def ray_timeline(start_wall: float, end_wall: float) -> dict[str, Any]:
    """Actor start and operator activity between two wall-clock times, from Ray's task events
    (`ray.timeline()`, which the GCS keeps without a dashboard). Per actor: when its constructor
    (model load, the matting compile) started and how long it took, and when its first batch
    started, in seconds since the plan started. Per operator: tasks, busy seconds, and the mean
    and peak number of its tasks running at once."""
    import ray

    time.sleep(2.0)  # workers report task events once a second
    events = [
        e
        for e in ray.timeline()
        if e.get("ph") == "X"
        and str(e.get("cat", "")).startswith("task::")
        and start_wall * 1e6 <= e["ts"] <= end_wall * 1e6
    ]
    actors: dict[str, dict[str, Any]] = {}
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in events:
        name = e["cat"][len("task::") :]
        start, end = e["ts"] / 1e6 - start_wall, (e["ts"] + e["dur"]) / 1e6 - start_wall
        worker = re.match(r"MapWorker\((.+)\)\.(\w+)$", name)
        if worker:  # a Ray Data actor: its constructor, then one `submit` per bundle
            operator, method = worker.groups()
            actor = actors.setdefault(e["tid"], {"operator": operator})
            if method == "__init__":
                actor.update(init_start_s=round(start, 3), init_s=round(end - start, 3))
            elif method == "submit":
                if "first_batch_start_s" not in actor or start < actor["first_batch_start_s"]:
                    actor.update(first_batch_start_s=round(start, 3), first_batch_s=round(end - start, 3))
                spans.setdefault(operator, []).append((start, end))
        elif name.startswith(("MapBatches(", "ReadRange", "FromArrow", "FromItems", "Write")):
            spans.setdefault(name, []).append((start, end))
    operators = {}
    for name, intervals in spans.items():
        first, last = min(s for s, _ in intervals), max(e for _, e in intervals)
        busy = sum(e - s for s, e in intervals)
        edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
        running = peak = 0
        for _, step in edges:
            running += step
            peak = max(peak, running)
        operators[name] = {
            "tasks": len(intervals),
            "first_start_s": round(first, 3),
            "last_end_s": round(last, 3),
            "busy_s": round(busy, 3),
            "mean_concurrency": round(busy / (last - first), 2) if last > first else None,
            "peak_concurrency": peak,
        }
    return {
        "actors": sorted(actors.values(), key=lambda a: (a["operator"], a.get("init_start_s", 0))),
        "operators": operators,
    }


def compile_caches() -> dict[str, Any]:
    """Where torch.compile keeps what it compiled (Inductor's FX graph and autograd caches,
    Triton's kernels), and how many files each holds. Every process of this user reads the
    same folders, so a fresh actor loads what an earlier one compiled; a timed build that
    adds no files compiled nothing new."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        inductor = cache_dir()
    except ImportError:
        inductor = os.environ.get(
            "TORCHINDUCTOR_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
        )
    triton = os.environ.get("TRITON_CACHE_DIR", str(Path.home() / ".triton" / "cache"))

    def files(root: str) -> int:
        return sum(len(names) for _, _, names in os.walk(root)) if os.path.isdir(root) else 0

    return {
        "inductor_dir": inductor,
        "inductor_files": files(inductor),
        "triton_dir": triton,
        "triton_files": files(triton),
    }


class PlanProbe:
    """Wraps pipeline.data.build.run_plan: the plan's clock (from the start of execution to its last
    shard), the shard watch, and the executed Dataset's Ray Data stats."""

    def __init__(self, on_progress) -> None:
        self._run_plan = build.run_plan
        self.on_progress = on_progress
        self.reset()

    def reset(self) -> None:
        self.start = self.start_wall = self.end = self.end_wall = None
        self.watch: ShardWatch | None = None
        self.stats = ""

    def __call__(self, ds, staging_root: str, progress: bool = True):
        self.start, self.start_wall = time.perf_counter(), time.time()
        self.watch = ShardWatch(Path(staging_root) / "data", self.start, self.on_progress)
        self.watch.start()
        try:
            results = self._run_plan(ds, staging_root, progress)
        finally:
            self.end, self.end_wall = time.perf_counter(), time.time()
            self.watch.stop()
        executed = getattr(ds, "_write_ds", None) or ds  # write_datasink keeps its executed plan here
        self.stats = executed.stats()
        return results

    def progress(self) -> dict[str, Any]:
        """Rows written so far, for a report saved while the plan runs."""
        if self.start is None or self.watch is None:
            return {}
        shards = list(self.watch.shards)
        return {
            "plan_elapsed_s": round(time.perf_counter() - self.start, 2),
            "shards": len(shards),
            "rows": sum(rows for _, rows in shards),
            "first_rows_s": round(min(t for t, _ in shards), 3) if shards else None,
        }


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def operator_throughput(stats: str) -> list[dict[str, Any]]:
    """Each operator's name, tasks, remote wall and CPU time (total and mean per task, s) and
    rows/s from the text of Dataset.stats()."""
    operators = []
    for block in re.split(r"\n(?=Operator \d+ )", stats):
        head = re.match(r"Operator \d+ (.+?): (\d+) tasks executed", block)
        if not head:
            continue
        row: dict[str, Any] = {"operator": head.group(1), "tasks": int(head.group(2))}
        for kind in ("wall", "cpu"):
            found = re.search(rf"Remote {kind} time: .*?([\d.]+)(us|ms|s) mean, ([\d.]+)(us|ms|s) total", block)
            if found:
                row[f"task_{kind}_mean_s"] = float(found.group(1)) * _UNITS[found.group(2)]
                row[f"task_{kind}_total_s"] = float(found.group(3)) * _UNITS[found.group(4)]
        for key, pattern in (
            ("rows_per_s", r"Ray Data throughput: ([\d.]+) rows/s"),
            ("single_task_rows_per_s", r"Estimated single task throughput: ([\d.]+) rows/s"),
        ):
            found = re.search(pattern, block)
            if found:
                row[key] = float(found.group(1))
        operators.append(row)
    return operators


def run_build(source: Path, out: Path, overrides: list[str]) -> tuple[dict[str, Any], float]:
    config = load_config(overrides=overrides)
    started = time.perf_counter()
    result = build.build_dataset(source, out, config, incremental=False, progress=False)
    seconds = time.perf_counter() - started
    if result.status != "built":
        raise SystemExit(f"build did not finish: {result.message}")
    return result.manifest, seconds


def build_report(
    variant: str, manifest: dict[str, Any], wall: float, probe: PlanProbe, per_photo: int
) -> dict[str, Any]:
    photos = manifest["inputs"]
    rows = written_rates(probe.watch.shards if probe.watch else [], per_photo)
    last_row = rows.get("last_rows_s")
    result = {
        "variant": variant,
        "photos": photos,
        "accepted": manifest["accepted"],
        "rejected": manifest["rejected"],
        "rows": manifest["rows"],
        "rejects_by_reason": manifest["rejects_by_reason"],
        "build_wall_s": round(wall, 3),
        "plan_s": round(probe.end - probe.start, 3),
        "plan_to_last_row_s": last_row,
        # End to end: the driver's clock from the start of the plan to the last row written.
        "end_to_end_photos_per_s": round(photos / last_row, 2) if last_row else None,
        "build_photos_per_s": round(photos / wall, 2),
        "first_rows_s": rows.get("first_rows_s"),
        "steady_photos_per_s": rows.get("steady_photos_per_s"),
        "p10_p90_photos_per_s": rows.get("p10_p90_photos_per_s"),
        "written": rows,
        "stage_seconds": manifest["stage_seconds"],
        # Photos that reached the caption stage: accepted, or rejected after it.
        "caption": stage_shares(
            manifest["stage_seconds"],
            manifest["accepted"] + sum(n for s, n in manifest["rejects_by_stage"].items() if s in ("matte", "filter", "composite")),
        ),
        "ray_data_operators": operator_throughput(probe.stats),
        "ray_data_stats": probe.stats,
    }
    try:
        result["timeline"] = ray_timeline(probe.start_wall, probe.end_wall)
    except Exception as exc:  # the timings above stand without it
        result["timeline"] = {"error": repr(exc)}
    return result


def print_build(b: dict[str, Any]) -> None:
    print(
        f"\ndata build [{b['variant'] or 'defaults'}]: {b['photos']} photos ({b['accepted']} accepted, "
        f"{b['rejected']} rejected, {b['rows']} rows)\n"
        f"  end to end (plan start -> last row): {b['plan_to_last_row_s']} s = {b['end_to_end_photos_per_s']} photos/s; "
        f"whole build {b['build_wall_s']} s = {b['build_photos_per_s']} photos/s\n"
        f"  first rows at {b['first_rows_s']} s; steady (first -> last shard) {b['steady_photos_per_s']} photos/s; "
        f"10-90% {b['p10_p90_photos_per_s']} photos/s\n"
        f"  compile cache files added: {b.get('compile_cache_files_added')}\n"
        f"  caption: {b['caption']['caption_photos_per_s_per_actor']} photos/s per actor; stage shares {b['caption']['share']}"
    )
    for actor in b["timeline"].get("actors", []):
        print(f"  actor {actor}")
    for name, op in b["timeline"].get("operators", {}).items():
        print(f"  {name}: {op}")
    for op in b["ray_data_operators"]:
        print(f"  {op}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=8192)
    parser.add_argument("--warm-up-photos", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="side of the square source photos, px")
    parser.add_argument("--clipseg", default="random-rd64", help="'random-rd64' (built here), 'tiny', or a path")
    parser.add_argument(
        "--captioner",
        default="random-blip2",
        help="'random-blip2', 'random-blip-large', 'random-blip-base' (built here), 'tiny', "
        "'off' (no caption stage), or a path",
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="CPU sanity of the script: 32 photos of 96 px, tiny CLIPSeg and captioner, pymatting, 3 CPUs (the GPU plan's "
        "matting actors compile their kernels for minutes on a CPU: see the fake-GPU command above for that plan)",
    )  # fmt: skip
    parser.add_argument(
        "--trimaps",
        choices=("prior", "clipseg"),
        default="prior",
        help="subject-shaped maps, or the random CLIPSeg's own",
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; None = all")
    parser.add_argument("--fake-gpus", type=int, default=0, help="CPU sanity: tell Ray there are GPUs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder; default a temporary one")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole script: variants that would not fit are "
        "skipped, and at the limit the report is saved with the running build's progress and the script exits 3",
    )
    parser.add_argument(
        "--variant",
        action="append",
        help="overrides ('k=v k=v'; captioner=SETTING as --captioner) of one timed build; repeatable; "
        "default one build",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=0,
        help="make a folder of this many distinct background photos, which a --variant names as "
        "data.backgrounds.folder={pool} (the default builds use the bundled 12 procedural backgrounds)",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides of every build, key=value")
    args = parser.parse_args(argv)
    if args.smoke:
        args.photos, args.warm_up_photos, args.size, args.num_cpus, args.fake_gpus = 32, 8, 96, 3, 0
        args.clipseg = "tiny"
        args.captioner = "tiny" if args.captioner == "random-blip2" else args.captioner
        args.overrides = ["data.matte.backend=pymatting", "data.caption.max_new_tokens=8", *args.overrides]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    report = Report(args.out)
    report.data.update(
        hardware=describe("ray"),
        command=" ".join(sys.argv),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        budget_s=args.budget,
    )
    probe = PlanProbe(on_progress=lambda: None)
    current: dict[str, Any] = {}  # the build running now, as it stands

    def on_progress() -> None:
        current["progress"] = probe.progress()
        report.save()

    probe.on_progress = on_progress

    def stop_now(reason: str) -> None:
        """Save what there is, with the running build's progress, and leave at once."""
        current["progress"] = probe.progress()
        current["status"] = f"stopped: {reason}"
        report.data["stopped"] = {"reason": reason, "at_s": round(time.perf_counter() - started, 1)}
        report.save()
        # The actors' start, if Ray answers in time. Not from the signal handler: it runs on the
        # main thread, inside whatever Ray call the build was making.
        if reason == "budget" and probe.start_wall is not None and probe.end_wall is None:

            def timeline() -> None:
                try:
                    current["timeline"] = ray_timeline(probe.start_wall, time.time())
                except Exception as exc:
                    current["timeline"] = {"error": repr(exc)}

            helper = threading.Thread(target=timeline, daemon=True)
            helper.start()
            helper.join(timeout=20)
            report.save()
        print(f"\nstopped ({reason}); report saved to {args.out}", flush=True)
        # Stop the local Ray (its agents outlive a bare exit), but never wait long on it.
        shutdown = threading.Thread(target=lambda: __import__("ray").shutdown(), daemon=True)
        shutdown.start()
        shutdown.join(timeout=15)
        os._exit(3)

    deadline = threading.Timer(max(0.0, args.budget or 0.0), stop_now, args=("budget",))
    deadline.daemon = True
    if args.budget is not None:
        deadline.start()

    if args.clipseg == "random-rd64":
        clipseg = str(make_random_clipseg(work / "clipseg-rd64-random"))
    else:
        clipseg = str(TINY_CLIPSEG if args.clipseg == "tiny" else args.clipseg)
    captioner = captioner_overrides(args.captioner, work)
    variants = {variant: variant_overrides(variant, work) for variant in args.variant or [""]}
    workers = args.num_cpus or os.cpu_count() or 1
    warm_source = make_source(work / "warm-source", args.warm_up_photos, args.size, workers)
    source = make_source(work / "source", args.photos, args.size, workers)
    if args.pool:
        make_pool(work / POOL, args.pool, args.size, workers)
    report.data["setup_s"] = round(time.perf_counter() - started, 2)
    log.info("setup (CLIPSeg, captioner, %d + %d photos): %.1f s", args.warm_up_photos, args.photos, report.data["setup_s"])

    speckle = [  # random weights: see the module docstring
        "data.segment.normalize=minmax",
        "data.trimap.erode_fg_px=0",
        "data.trimap.erode_bg_px=0",
    ]
    if args.trimaps == "prior":
        build.build_dataset_plan = with_prior_trimaps(build.build_dataset_plan)
    report.data["trimaps"] = args.trimaps
    overrides = [
        f"models.clipseg={clipseg}",
        *captioner,
        # The people filter's CLIPSeg pass runs at full cost, but a random CLIPSeg's "person" maps
        # must not reject photos: no share of a photo is more than all of it.
        "data.filter.exclude_area=1.0",
        *(speckle if args.trimaps == "clipseg" else []),
        *([f"ray.num_cpus={args.num_cpus}"] if args.num_cpus else []),
        *args.overrides,
    ]
    report.data["overrides"] = overrides
    import ray

    from pipeline.raycluster import ensure_ray

    # Name the compile caches in the environment before Ray starts, so that every worker (Ray
    # passes the driver's environment to the workers of a local cluster) reads the folders the
    # report counts.
    caches = compile_caches()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", caches["inductor_dir"])
    os.environ.setdefault("TRITON_CACHE_DIR", caches["triton_dir"])
    report.data["compile_caches"] = {"before_warm_up": caches}
    ray_started = time.perf_counter()
    if args.fake_gpus:  # the GPU plan's actors and shares, solved on CPU
        ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.fake_gpus, include_dashboard=False)
    else:
        ensure_ray(load_config(overrides=overrides).ray)
    report.data["ray_init_s"] = round(time.perf_counter() - ray_started, 2)
    signal.signal(signal.SIGTERM, lambda *_: stop_now("SIGTERM"))  # after ray.init, which sets its own
    report.data["cluster"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    build.run_plan = probe
    per_photo = load_config(overrides=overrides).data.composite.per_photo

    report.data["warm_up"] = current
    current.update(photos=args.warm_up_photos, status="running")
    try:
        _, warm_seconds = run_build(warm_source, work / "warm-out", overrides)
    except BaseException as exc:
        current.update(status="failed", error=repr(exc))
        report.save()
        raise
    current.update(status="done", build_wall_s=round(warm_seconds, 2), plan_s=round(probe.end - probe.start, 2))
    try:  # the actors' cold start: CLIPSeg's first load, the matting kernels' first compile
        current["timeline"] = ray_timeline(probe.start_wall, probe.end_wall)
    except Exception as exc:
        current["timeline"] = {"error": repr(exc)}
    report.data["compile_caches"]["after_warm_up"] = compile_caches()
    log.info("warm-up build: %d photos in %.1f s", args.warm_up_photos, warm_seconds)
    for actor in current["timeline"].get("actors", []):
        log.info("warm-up actor %s", actor)
    report.save()

    report.data["builds"] = []
    previous = None
    for n, variant in enumerate(args.variant or [""]):
        left = args.budget - (time.perf_counter() - started) if args.budget is not None else None
        if left is not None and previous is not None and previous > left:
            log.warning("budget: %.0f s left, the last build took %.0f s; skipping %r", left, previous, variant)
            report.data["builds"].append({"variant": variant, "status": "skipped: budget"})
            report.save()
            continue
        probe.reset()
        caches = compile_caches()
        current = {"variant": variant, "status": "running"}
        report.data["builds"].append(current)
        report.save()
        try:
            manifest, seconds = run_build(source, work / f"out-{n}", [*overrides, *variants[variant]])
        except Exception as exc:  # record it and go on to the next variant
            log.exception("build with %r failed", variant)
            current.update(status="failed", error=repr(exc))
            report.save()
            continue
        previous = seconds
        current.update(build_report(variant, manifest, seconds, probe, per_photo), status="done")
        after = compile_caches()
        current["compile_cache_files_added"] = {k: after[k] - caches[k] for k in ("inductor_files", "triton_files")}
        report.save()
        print_build(current)
    print(
        f"\n{report.data['hardware']}\ncluster {report.data['cluster']}; date {report.data['date']}; "
        f"command: {report.data['command']}"
    )
    deadline.cancel()
    report.save()


if __name__ == "__main__":
    main()
