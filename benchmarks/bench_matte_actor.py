"""The matte stage's GPU actor (`stages.matte.Matter`) on its own: start, photos/s, and where a
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
- `actor`: photos/s of `Matter.__call__` over --batches batches after the first;
- `phases`: one batch's upload, alpha, foreground and download, each timed after a synchronise,
  with the stencil build compiled and eager (`compile=False` costs no start: the trade-off);
- `profile`: torch.profiler's top CUDA kernels and CPU ops over one `__call__`;
- `finish`: the CPU task after matting (`filter_composite_encode`) on the actor's output, in this
  process, per photo: what the pipeline's CPU tasks would take without Ray around them.

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


def time_start(args: argparse.Namespace, first: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    from stages.matte import Matter

    started = time.perf_counter()
    matter = Matter(batch_size=args.batch_size, tol=args.tol, photo_size=args.size)
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
    """One batch through the actor's steps, each timed after a synchronise, compiled and eager."""
    from stages.matting_torch import estimate_alpha_cf_torch, estimate_foreground_torch

    result: dict[str, Any] = {"photos": len(batch[SOURCE_URI])}
    for compiled in (True, False):
        row: dict[str, float] = {}
        for _repeat in range(2):  # the first pass of the eager variant warms the allocator
            sync()
            t0 = time.perf_counter()
            rgb = torch.from_numpy(batch[IMAGE]).to(device).float() / 255.0
            tri = torch.from_numpy(batch[TRIMAP].astype(np.float32)).to(device)
            sync()
            t1 = time.perf_counter()
            alpha = estimate_alpha_cf_torch(rgb, tri, tol=tol, compile=compiled)
            sync()
            t2 = time.perf_counter()
            foreground = estimate_foreground_torch(rgb, alpha, compile=compiled)
            sync()
            t3 = time.perf_counter()
            alpha.cpu().numpy(), (foreground * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            t4 = time.perf_counter()
            row = {
                "upload_ms_per_photo": 1e3 * (t1 - t0),
                "alpha_ms_per_photo": 1e3 * (t2 - t1),
                "foreground_ms_per_photo": 1e3 * (t3 - t2),
                "download_ms_per_photo": 1e3 * (t4 - t3),
            }
        n = result["photos"]
        result["compiled" if compiled else "eager"] = {k: round(v / n, 3) for k, v in row.items()}
    unknown = float((batch[TRIMAP] == 0.5).mean())
    result["unknown_fraction"] = round(unknown, 4)
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
    """filter -> composite -> encode in this process, on the actor's output, 8 photos a call."""
    from pipeline.backgrounds import list_backgrounds
    from pipeline.dataplan import filter_composite_encode, finish_args

    config = load_config()
    kwargs = finish_args(config, list_backgrounds(config.data.backgrounds), "bench")
    out = matter(copy_batch(batch))
    n = len(out[SOURCE_URI])
    started = time.perf_counter()
    for start in range(0, n, 8):
        part = {k: v[start : start + 8] for k, v in out.items()}
        filter_composite_encode(part, **kwargs)
    seconds = time.perf_counter() - started
    return {"photos": n, "ms_per_photo": round(1e3 * seconds / n, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="timed batches after the first")
    parser.add_argument("--tol", type=float, default=None, help="default: data.matte.tol")
    parser.add_argument("--rows", type=int, default=30, help="rows of each profile table")
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
    tables = profile_call(matter, batches[1], args.rows)
    report["profile"] = tables
    for name, table in tables.items():
        print(f"\n{name} profile of one __call__ ({args.batch_size} photos):\n{table}")
    save()
    report["finish"] = time_finish(matter, batches[1])
    log.info("finish (CPU, in process): %s", report["finish"])
    report["dynamo_after"] = dynamo_account()
    save()
    print(json.dumps({k: report[k] for k in ("start", "actor", "phases", "finish")}, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
