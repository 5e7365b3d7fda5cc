"""The matte stage's GPU actor (`stages.matte_composite.MatteFilterComposite`) on its own: start, photos/s, and where a
batch's time goes, with the batches the pipeline hands it but no Ray around it.

`bench_pipeline.py` measures the actor inside the whole build, where it shares the GPU with the
CLIPSeg actors and its batches come through the object store. This script gives the two numbers
that build can be compared with: the actor's own rate on the same kind of batch, and its start.

Batches are what `SegmentAndTrimap` emits: DreamBench-mini photos at --size (uint8), with
trimaps made by the trimap stage's defaults from a subject-shaped confidence map
(`tests.matting_fixtures.subject_confidence`: 17-36% of a photo unknown, as with real subjects;
a random-weight CLIPSeg's speckle leaves 0.15%). Reported:

- `start`: the constructor (its warm-up compiles at --size) and the first batch after it, with
  torch.compile's own account of where the time went;
- `actor`: photos/s of the actor's `__call__` over --batches batches after the first;
- `phases`: one batch's upload, alpha, foreground and download, each timed after a synchronise;
- `kernels` (CUDA): the stencil build and the foreground estimate as Triton kernels (the
  default) against torch.compile (before), first call and ms per photo, in the same run;
- `profile`: torch.profiler's top CUDA kernels and CPU ops over one `__call__`;
- `finish`: the CPU task after the actor (`encode_batch`) on its output, in this process, per
  photo: what the pipeline's CPU tasks would take without Ray around them.

The actor is made as the plan makes it on a GPU node: it also filters and composites (K rows
per photo) on its device.

    python benchmarks/bench_matte_actor.py --out $OUT/bench_matte_actor.json   # GPU machine
    python benchmarks/bench_matte_actor.py --size 96 --batch-size 4 --batches 2  # CPU sanity
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import describe  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from stages.records import (  # noqa: E402
    CATEGORY,
    IMAGE,
    REJECT_REASON,
    REJECT_STAGE,
    SOURCE_PATH,
    SOURCE_SHA256,
    SOURCE_URI,
    SUBJECT_ID,
    TRIMAP,
)
from stages.trimap import make_trimap  # noqa: E402
from tests.matting_fixtures import subject_confidence  # noqa: E402

PHOTOS = REPO / "datasets" / "dreambench-mini"

log = logging.getLogger("bench_matte_actor")


def make_batch(size: int, count: int, offset: int) -> dict[str, np.ndarray]:
    """`count` photos in the columns `SegmentAndTrimap` emits, photo i from DreamBench-mini
    (cycling) with the trimap of subject prior number offset + i."""
    files = sorted(PHOTOS.glob("*/*.jpg"))
    trimap_args = load_config().data.trimap.model_dump()
    images, trimaps, uris = [], [], []
    for i in range(count):
        path = files[(offset + i) % len(files)]
        images.append(np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)))
        trimaps.append(make_trimap(subject_confidence(size, size, offset + i), **trimap_args))
        uris.append(f"{path}#{offset + i}")
    text = lambda values: np.asarray(values, dtype=object)  # noqa: E731
    return {
        SUBJECT_ID: text([Path(u).parent.name for u in uris]),
        CATEGORY: text(["subject"] * count),
        SOURCE_URI: text(uris),
        SOURCE_PATH: text(uris),
        SOURCE_SHA256: text([f"{offset + i:064x}" for i in range(count)]),
        REJECT_STAGE: text([""] * count),
        REJECT_REASON: text([""] * count),
        IMAGE: np.stack(images),
        TRIMAP: np.stack(trimaps),
    }


def copy_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A fresh batch per call: the actor writes its reject columns in place."""
    return {k: v.copy() for k, v in batch.items()}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dynamo_account() -> dict[str, Any]:
    """torch.compile's counters: graphs traced, recompiles, and its per-phase seconds."""
    from torch._dynamo.utils import compile_times, counters

    stats = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break", "frames")}
    try:
        times = compile_times(repr="str")
    except Exception as exc:  # its signature moves between releases
        times = repr(exc)
    return {"counters": stats, "compile_times": times}


def finish_arguments() -> dict[str, Any]:
    """What the plan gives the actor and the task after it (pipeline.data.plan), for the bundled
    backgrounds: the filter's and composite's arguments, and the encoder's."""
    from pipeline.data.backgrounds import list_backgrounds
    from pipeline.data.plan import finish_args

    config = load_config()
    return finish_args(config, list_backgrounds(config.data.backgrounds), "bench")


def time_start(args: argparse.Namespace, first: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    from stages.matte_composite import MatteFilterComposite

    finish = finish_arguments()
    started = time.perf_counter()
    matter = MatteFilterComposite(
        finish["filter_args"], finish["composite_args"], batch_size=args.batch_size, tol=args.tol, photo_size=args.size
    )
    sync()
    constructed = time.perf_counter()
    matter(copy_batch(first))
    sync()
    done = time.perf_counter()
    return matter, {
        "constructor_s": round(constructed - started, 2),
        "first_batch_s": round(done - constructed, 2),
        "dynamo": dynamo_account(),
    }


def time_actor(matter: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    times, rejected = [], 0
    for batch in batches:
        fresh = copy_batch(batch)
        sync()
        started = time.perf_counter()
        out = matter(fresh)
        sync()
        times.append(time.perf_counter() - started)
        rejected += int((np.asarray(out[REJECT_STAGE]) != "").sum())
    photos = sum(len(b[SOURCE_URI]) for b in batches)
    return {
        "photos": photos,
        "seconds": round(sum(times), 3),
        "photos_per_s": round(photos / sum(times), 1),
        "ms_per_photo": round(1e3 * sum(times) / photos, 3),
        "per_batch_s": [round(t, 3) for t in times],
        "rejected": rejected,
    }


def time_phases(batch: dict[str, np.ndarray], tol: float, device: torch.device) -> dict[str, Any]:
    """One batch through the actor's steps, each timed after a synchronise (second pass)."""
    from stages.matting import estimate_alpha_cf_torch, estimate_foreground_torch

    n = len(batch[SOURCE_URI])
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        rgb = torch.from_numpy(batch[IMAGE]).to(device).float() / 255.0
        tri = torch.from_numpy(batch[TRIMAP].astype(np.float32)).to(device)
        sync()
        t1 = time.perf_counter()
        alpha = estimate_alpha_cf_torch(rgb, tri, tol=tol)
        sync()
        t2 = time.perf_counter()
        foreground = estimate_foreground_torch(rgb, alpha)
        sync()
        t3 = time.perf_counter()
        alpha.cpu().numpy(), (foreground * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        t4 = time.perf_counter()
    ms = lambda seconds: round(1e3 * seconds / n, 3)  # noqa: E731
    return {
        "photos": n,
        "unknown_fraction": round(float((batch[TRIMAP] == 0.5).mean()), 4),
        "upload_ms_per_photo": ms(t1 - t0),
        "alpha_ms_per_photo": ms(t2 - t1),
        "foreground_ms_per_photo": ms(t3 - t2),
        "download_ms_per_photo": ms(t4 - t3),
    }


def compare_kernels(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
    """The stencil build and the foreground estimate with the Triton kernels (the default on
    CUDA) against torch.compile (what ran before): first call (the start cost: trace and
    compile, or load from the caches) and ms per photo after it, on this batch at full size."""
    from stages.matting import estimate_foreground_torch, laplacian
    from stages.matting._kernels import compiled
    from stages.matting.laplacian_triton import build_stencil

    n = len(batch[SOURCE_URI])
    image = (torch.from_numpy(batch[IMAGE]).to(device).float() / 255.0).permute(0, 3, 1, 2).contiguous()
    alpha = torch.from_numpy((batch[TRIMAP] > 0.5).astype(np.float32)).to(device)
    rgb = image.permute(0, 2, 3, 1)
    candidates = {
        "stencil_triton": lambda: build_stencil(image, None, 1e-7, 1),
        "stencil_torch_compile": lambda: compiled(laplacian.build_stencil)(image, None, 1e-7, 1),
        "foreground_triton": lambda: estimate_foreground_torch(rgb, alpha),
        "foreground_torch_compile": lambda: estimate_foreground_torch(rgb, alpha, compile=True),
    }
    result = {}
    for name, fn in candidates.items():
        sync()
        started = time.perf_counter()
        fn()
        sync()
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        result[name] = {
            "first_call_s": round(first, 2),
            "ms_per_photo": round(1e3 * (time.perf_counter() - started) / (3 * n), 3),
        }
        log.info("%s: %s", name, result[name])
    return result


def profile_call(matter: Any, batch: dict[str, np.ndarray], rows: int) -> dict[str, str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        matter(copy_batch(batch))
        sync()
    averages = prof.key_averages()
    tables = {"cpu": averages.table(sort_by="self_cpu_time_total", row_limit=rows)}
    if torch.cuda.is_available():
        tables["cuda"] = averages.table(sort_by="self_cuda_time_total", row_limit=rows)
    return tables


def time_finish(matter: Any, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """The CPU task after the actor (encode_batch) in this process, on the actor's output, 8
    photos' rows a call, as the plan batches it."""
    from stages.write import encode_batch

    encode_args = finish_arguments()["encode_args"]
    out = matter(copy_batch(batch))
    rows = len(out[SOURCE_URI])
    step = 8 * load_config().data.composite.per_photo
    started = time.perf_counter()
    for start in range(0, rows, step):
        encode_batch({k: v[start : start + step] for k, v in out.items()}, **encode_args)
    seconds = time.perf_counter() - started
    photos = len(batch[SOURCE_URI])
    return {"photos": photos, "rows": rows, "ms_per_photo": round(1e3 * seconds / photos, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="timed batches after the first")
    parser.add_argument("--tol", type=float, default=None, help="default: data.matte.tol")
    parser.add_argument("--rows", type=int, default=30, help="rows of each profile table")
    parser.add_argument("--no-compare", action="store_true", help="skip the torch.compile baselines (`kernels`)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.tol is None:
        args.tol = load_config().data.matte.tol
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = {
        "hardware": describe(),
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size": args.size,
        "batch_size": args.batch_size,
        "tol": args.tol,
    }

    def save() -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    batches = [make_batch(args.size, args.batch_size, n * args.batch_size) for n in range(args.batches + 1)]
    matter, report["start"] = time_start(args, batches[0])
    log.info("start: %s", {k: v for k, v in report["start"].items() if k != "dynamo"})
    save()
    report["actor"] = time_actor(matter, batches[1:])
    log.info("actor: %s", report["actor"])
    save()
    report["phases"] = time_phases(batches[1], args.tol, device)
    log.info("phases: %s", report["phases"])
    save()
    if device.type == "cuda" and not args.no_compare:
        report["kernels"] = compare_kernels(batches[1], device)
        save()
    tables = profile_call(matter, batches[1], args.rows)
    report["profile"] = tables
    for name, table in tables.items():
        print(f"\n{name} profile of one __call__ ({args.batch_size} photos):\n{table}")
    save()
    report["finish"] = time_finish(matter, batches[1])
    log.info("finish (CPU, in process): %s", report["finish"])
    report["dynamo_after"] = dynamo_account()
    save()
    print(
        json.dumps(
            {k: report.get(k) for k in ("start", "actor", "phases", "kernels", "finish")}, indent=1, default=str
        )[:6000]
    )


if __name__ == "__main__":
    main()
