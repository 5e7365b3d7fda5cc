"""Whole `data build` throughput on one node: photos/s end to end, and Ray Data's per-stage stats.

The build runs `pipeline.build.build_dataset`, which is what `subjectforge data build` calls, on a
source of --photos photos. They are DreamBench-mini's 40 JPEGs, each copy jittered (crop, flip,
brightness) so that no two files are the same bytes. CLIPSeg is real-sized: the
CIDAS/clipseg-rd64-refined architecture (ViT-B/16 vision tower, CLIP text tower, rd64 decoder,
352 px processor) with random weights, saved in the official layout. Its random weights make
timings real, not masks: its maps are speckle, so the run uses the tiny profile's trimap settings
(per-photo min-max scaling, no erosion), which leave all three trimap regions in every photo.

A warm-up build of --warm-up-photos photos goes first. It fills the page cache with CLIPSeg's
weights and the torch.compile caches of the matting kernels, which a long-running node keeps
between builds. The timed build starts fresh actors, and its clock includes their start.

    python benchmarks/bench_pipeline.py --out $OUT/bench_pipeline.json            # GPU machine
    python benchmarks/bench_pipeline.py --photos 24 --warm-up-photos 8 --size 96 \\
        --clipseg tiny --num-cpus 2 --fake-gpus 1 data.matte.backend=torch     # CPU-only sanity
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import sys
import tempfile
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

import pipeline.build as build  # noqa: E402
from pipeline.config import ASSETS_DIR, load_config  # noqa: E402

PHOTOS = REPO / "datasets" / "dreambench-mini"
TINY_CLIPSEG = ASSETS_DIR / "tiny-clipseg"

log = logging.getLogger("bench_pipeline")


def make_random_clipseg(out: Path) -> Path:
    """CIDAS/clipseg-rd64-refined's architecture and processor with random weights, written by
    save_pretrained (config.json, model.safetensors, processor and tokenizer files). The
    tokenizer is the tiny checkpoint's byte-level one: prompts are a few tokens either way."""
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

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
    image_processor = ViTImageProcessor(
        do_resize=True,
        size={"height": 352, "width": 352},
        resample=2,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    tokenizer = CLIPTokenizer(str(TINY_CLIPSEG / "vocab.json"), str(TINY_CLIPSEG / "merges.txt"))
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    log.info(
        "random CLIPSeg rd64-refined: %.1fM parameters at %s", sum(p.numel() for p in model.parameters()) / 1e6, out
    )
    return out


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


class _StatsCapture:
    """Wraps pipeline.build.run_plan to keep the executed Dataset's Ray Data stats."""

    def __init__(self) -> None:
        self.text = ""
        self._run_plan = build.run_plan

    def __call__(self, ds, staging_root: str, progress: bool = True):
        results = self._run_plan(ds, staging_root, progress)
        executed = getattr(ds, "_write_ds", None) or ds  # write_datasink keeps its executed plan here
        self.text = executed.stats()
        return results


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def operator_throughput(stats: str) -> list[dict[str, Any]]:
    """Each operator's name, tasks, remote wall time (total and mean per task, s) and rows/s
    from the text of Dataset.stats()."""
    operators = []
    for block in re.split(r"\n(?=Operator \d+ )", stats):
        head = re.match(r"Operator \d+ (.+?): (\d+) tasks executed", block)
        if not head:
            continue
        row: dict[str, Any] = {"operator": head.group(1), "tasks": int(head.group(2))}
        wall = re.search(r"Remote wall time: .*?([\d.]+)(us|ms|s) mean, ([\d.]+)(us|ms|s) total", block)
        if wall:
            row["task_wall_mean_s"] = float(wall.group(1)) * _UNITS[wall.group(2)]
            row["task_wall_total_s"] = float(wall.group(3)) * _UNITS[wall.group(4)]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=3000)
    parser.add_argument("--warm-up-photos", type=int, default=192)
    parser.add_argument("--size", type=int, default=512, help="side of the square source photos, px")
    parser.add_argument("--clipseg", default="random-rd64", help="'random-rd64' (built here), 'tiny', or a path")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; None = all")
    parser.add_argument("--fake-gpus", type=int, default=0, help="CPU sanity: tell Ray there are GPUs")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder; default a temporary one")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--variant", action="append", help="overrides ('k=v k=v') of one timed build; repeatable; default one build"
    )
    parser.add_argument("overrides", nargs="*", help="config overrides of every build, key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_pipeline-"))
    report: dict[str, Any] = {
        "hardware": describe("ray"),
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    started = time.perf_counter()
    if args.clipseg == "random-rd64":
        clipseg = str(make_random_clipseg(work / "clipseg-rd64-random"))
    else:
        clipseg = str(TINY_CLIPSEG if args.clipseg == "tiny" else args.clipseg)
    workers = args.num_cpus or os.cpu_count() or 1
    warm_source = make_source(work / "warm-source", args.warm_up_photos, args.size, workers)
    source = make_source(work / "source", args.photos, args.size, workers)
    report["setup_s"] = time.perf_counter() - started
    log.info("setup (CLIPSeg, %d + %d photos): %.1f s", args.warm_up_photos, args.photos, report["setup_s"])

    overrides = [
        f"models.clipseg={clipseg}",
        "data.segment.normalize=minmax",  # random weights: see the module docstring
        "data.trimap.erode_fg_px=0",
        "data.trimap.erode_bg_px=0",
        *([f"ray.num_cpus={args.num_cpus}"] if args.num_cpus else []),
        *args.overrides,
    ]
    report["overrides"] = overrides
    import ray

    from pipeline.dataplan import ensure_ray

    ray_started = time.perf_counter()
    if args.fake_gpus:  # the GPU plan's actors and shares, solved on CPU
        ray.init(address="local", num_cpus=args.num_cpus, num_gpus=args.fake_gpus, include_dashboard=False)
    else:
        ensure_ray(load_config(overrides=overrides).ray)

    report["ray_init_s"] = time.perf_counter() - ray_started
    report["cluster"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}

    capture = _StatsCapture()
    build.run_plan = capture
    _, warm_seconds = run_build(warm_source, work / "warm-out", overrides)
    report["warm_up"] = {"photos": args.warm_up_photos, "wall_s": warm_seconds}
    log.info("warm-up build: %d photos in %.1f s", args.warm_up_photos, warm_seconds)
    save()

    report["builds"] = []
    for n, variant in enumerate(args.variant or [""]):
        capture.text = ""
        try:
            manifest, seconds = run_build(source, work / f"out-{n}", [*overrides, *variant.split()])
        except Exception as exc:  # record it and go on to the next variant
            log.exception("build with %r failed", variant)
            report["builds"].append({"variant": variant, "error": repr(exc)})
            save()
            continue
        report["builds"].append(
            {
                "variant": variant,
                "photos": manifest["inputs"],
                "accepted": manifest["accepted"],
                "rejected": manifest["rejected"],
                "rows": manifest["rows"],
                "rejects_by_reason": manifest["rejects_by_reason"],
                "wall_s": seconds,
                "photos_per_s": manifest["inputs"] / seconds,
                "rows_per_s": manifest["rows"] / seconds,
                "stage_seconds": manifest["stage_seconds"],
                "ray_data_operators": operator_throughput(capture.text),
                "ray_data_stats": capture.text,
            }
        )
        save()
        b = report["builds"][-1]
        print(
            f"\ndata build [{variant or 'defaults'}]: {b['photos']} photos ({b['accepted']} accepted, "
            f"{b['rejected']} rejected, {b['rows']} rows) in {b['wall_s']:.1f} s = {b['photos_per_s']:.1f} photos/s"
        )
        for op in b["ray_data_operators"]:
            print(op)
        print(capture.text)
    print(f"\n{report['hardware']}\ncluster {report['cluster']}; date {report['date']}; command: {report['command']}")


if __name__ == "__main__":
    main()
