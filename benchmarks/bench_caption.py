"""The caption stage's captioner on its own: `Captioner.caption_images`, eager against SDPA attention.

In the data build the captioner shares the GPU with CLIPSeg and matting (time-sliced between the
actors' processes), so each millisecond of GPU it saves goes to them. This script times the
stage's own call, with no Ray around it, for each --captioners setting (bench_pipeline.py's
`captioner_overrides` builds them: `random-blip-base` and `random-blip-large` are
Salesforce/blip-image-captioning-base's and -large's architecture with random weights in
float16, ViT-B/16 or ViT-L/16 at 384 px and a BERT-base decoder; `random-blip2`, `tiny` or a
path also work; `tiny-blip` is a 94k-parameter BLIP for CPU runs), at each --batch-sizes, with
data.caption.attention `eager` (transformers' own, the baseline) and `sdpa`
(stages/caption_attention.py) loaded side by side and measured in turn at each batch size.

Per captioner, batch size and attention:
- `ms_per_photo`, `photos_per_s`: --batches calls of caption_images on a batch of random photos
  (--photo-size px, resized on the device as in the build), after one warm-up call, each timed
  between two torch.cuda.synchronize();
- `peak_mib`: the captioner's weights plus the most memory its timed calls added on top of what
  was allocated before them (torch.cuda.max_memory_allocated), so that the other attention's
  captioner, loaded beside it, is not counted;
- `vision_ms`, `vision_share`: the vision encoder's forward alone on the same batch (median of 3
  after a warm-up), over a caption_images call: the rest (`decode_share`) is generate's decoding,
  the text decoder's cross-attention to the image included;
- `generated_length`: the length of generate()'s token sequences, its start token or prompt
  included (random weights never write the end of a caption: every photo gets --max-new-tokens);
- `same_captions_as_eager`: the share of photos whose caption is the eager one's (float16
  rounding can turn a random model's near-tie the other way).
`speedup` is eager's ms/photo over SDPA's. The JSON is written after every measurement.

    python benchmarks/bench_caption.py --out $OUT/bench_caption.json   # GPU machine
    python benchmarks/bench_caption.py --device cpu --smoke --out /tmp/bench_caption.json   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_pipeline import captioner_overrides, make_random_blip  # noqa: E402
from machine import describe  # noqa: E402

import stages.caption as caption  # noqa: E402
from pipeline.config import CaptionConfig  # noqa: E402
from stages.caption_attention import ATTENTION  # noqa: E402

log = logging.getLogger("bench_caption")

# A BLIP with the stage's code paths and almost no work, for CPU dry runs (tests/stages/test_caption.py's).
TINY_BLIP = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def captioner_path(setting: str, work: Path) -> str:
    """A --captioners setting as the captioner's folder: bench_pipeline's settings, or tiny-blip."""
    if setting == "tiny-blip":
        return str(make_random_blip(work / "blip-tiny-random", TINY_BLIP, TINY_BLIP, side=32, vocab=256))
    overrides = captioner_overrides(setting, work)
    if not overrides[0].startswith("models.captioner="):
        raise SystemExit(f"--captioners {setting!r} makes no captioner")
    return overrides[0].split("=", 1)[1]


def photos(n: int, side: int, seed: int) -> list[np.ndarray]:
    """`n` random uint8 photos of about `side` px (aspect ratios vary, as a source's do)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (side, side * (3 + i % 3) // 4, 3), dtype=np.uint8) for i in range(n)]


def synchronized(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """fn() and its seconds, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def vision_seconds(captioner: caption.Captioner, images: list[np.ndarray]) -> float | None:
    """The vision encoder's forward on `images`' pixels, median of 3 after a warm-up; None for a
    model without a `vision_model`."""
    vision = getattr(captioner.model, "vision_model", None)
    if vision is None:
        return None
    pixels = captioner.pixel_values(images)
    with torch.inference_mode():
        runs = [synchronized(captioner.device, lambda: vision(pixel_values=pixels))[1] for _ in range(4)]
    return statistics.median(runs[1:])


def weights(model: torch.nn.Module) -> int:
    """Bytes of `model`'s parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def generated_length(captioner: caption.Captioner, images: list[np.ndarray]) -> int:
    """caption_images(images), returning the length of the token sequences generate() returned."""
    generate = captioner.model.generate
    shapes = []

    def spy(**kwargs: Any) -> torch.Tensor:
        tokens = generate(**kwargs)
        shapes.append(tokens.shape)
        return tokens

    captioner.model.generate = spy
    try:
        captioner.caption_images(images)
    finally:
        del captioner.model.generate
    return int(shapes[0][1])


def measure(captioner: caption.Captioner, batches: list[list[np.ndarray]]) -> tuple[dict[str, Any], list[str]]:
    """caption_images over `batches` (the first a warm-up): times, peak memory, the vision
    encoder's share. Returns the figures and the first timed batch's captions."""
    device = captioner.device
    length = generated_length(captioner, batches[0])  # the warm-up call
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    seconds, captions = [], []
    for batch in batches[1:]:
        out, s = synchronized(device, lambda b=batch: captioner.caption_images(b))
        seconds.append(s)
        captions = captions or out
    size = len(batches[0])
    batch_s = statistics.mean(seconds)
    vision = vision_seconds(captioner, batches[1])
    result = {
        "batch_ms": [round(s * 1e3, 2) for s in seconds],
        "ms_per_photo": round(batch_s * 1e3 / size, 3),
        "photos_per_s": round(size / batch_s, 1),
        "peak_mib": round((torch.cuda.max_memory_allocated(device) - before + weights(captioner.model)) / 2**20) if device.type == "cuda" else None,
        "vision_ms": round(vision * 1e3, 2) if vision is not None else None,
        "vision_share": round(vision / batch_s, 3) if vision is not None else None,
        "decode_share": round(1 - vision / batch_s, 3) if vision is not None else None,
        "generated_length": length,
    }
    return result, captions


def bench_captioner(setting: str, path: str, args: argparse.Namespace, report: dict[str, Any], save: Callable[[], None]) -> None:
    """Eager and SDPA captioners of `path`, each batch size measured with both in turn."""
    captioners = {
        attention: caption.Captioner(path, max_new_tokens=args.max_new_tokens, batch_size=max(args.batch_sizes), attention=attention)
        for attention in ATTENTION[::-1]  # eager first: the baseline
    }
    for size in args.batch_sizes:
        batches = [photos(size, args.photo_size, seed) for seed in range(args.batches + 1)]
        eager_captions: list[str] = []
        for attention, captioner in captioners.items():
            result, captions = measure(captioner, batches)
            eager_captions = eager_captions or captions
            same = sum(a == b for a, b in zip(captions, eager_captions, strict=True)) / len(captions)
            row = {"captioner": setting, "attention": attention, "batch_size": size, "patched": captioner.attention,
                   **result, "same_captions_as_eager": round(same, 3)}  # fmt: skip
            report["results"].append(row)
            log.info("%s", row)
            save()
        eager, sdpa = (report["results"][-2 + i]["ms_per_photo"] for i in range(2))
        report["speedup"].setdefault(setting, {})[str(size)] = round(eager / sdpa, 3)
        save()
    del captioners
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def table(results: list[dict[str, Any]]) -> str:
    """The results, one line each."""
    head = f"{'captioner':<18} {'attention':<9} {'batch':>5} {'ms/photo':>9} {'photos/s':>9} {'peak MiB':>9} {'vision':>7} {'same':>5}"
    lines = [head]
    for r in results:
        share = f"{r['vision_share']:.0%}" if r["vision_share"] is not None else "-"
        lines.append(
            f"{r['captioner']:<18} {r['attention']:<9} {r['batch_size']:>5} {r['ms_per_photo']:>9.3f} {r['photos_per_s']:>9.1f} "
            f"{r['peak_mib'] if r['peak_mib'] is not None else '-':>9} {share:>7} {r['same_captions_as_eager']:>5.0%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captioners", nargs="+", default=None, help="default: random-blip-base random-blip-large (smoke: tiny tiny-blip)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None, help="default: 64 128 (smoke: 2)")
    parser.add_argument("--batches", type=int, default=None, help="timed calls after the warm-up; default 5 (smoke: 1)")
    parser.add_argument("--max-new-tokens", type=int, default=CaptionConfig().max_new_tokens)
    parser.add_argument("--photo-size", type=int, default=512, help="photos' long side, px")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="a dry run of the script: tiny captioners, one small batch")
    parser.add_argument("--work", type=Path, default=None, help="where the random captioners are kept; default a temporary folder")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    args.captioners = args.captioners or (["tiny", "tiny-blip"] if args.smoke else ["random-blip-base", "random-blip-large"])
    args.batch_sizes = args.batch_sizes or ([2] if args.smoke else [64, 128])
    args.batches = args.batches or (1 if args.smoke else 5)
    if args.smoke:
        args.max_new_tokens, args.photo_size = min(args.max_new_tokens, 6), min(args.photo_size, 64)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    caption.pick_device = lambda prefer_gpu=True: device  # the Captioner's device: --device
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_caption_"))
    report: dict[str, Any] = {
        "hardware": describe("transformers"),
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": [],
        "speedup": {},
    }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    for setting in args.captioners:
        bench_captioner(setting, captioner_path(setting, work), args, report, save)
    print(table(report["results"]))
    print("speedup (eager ms/photo over sdpa's):", json.dumps(report["speedup"]))


if __name__ == "__main__":
    main()
