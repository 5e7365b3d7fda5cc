"""Closed-form matting throughput: the batched torch solver on one GPU against pymatting on every
CPU core, on the same photos in the same run.

Photos are DreamBench-mini's 40 JPEGs (datasets/dreambench-mini), resized bicubically to each
--sizes, in float32 [0, 1]. The trimap is an elliptical ring leaving ~25% of the pixels unknown.
Torch times `estimate_alpha_cf_torch` over --photos photos (cycling the 40) in batches, with
inputs already on the device and the GPU synchronised. Each batch size gets one warm-up pass,
which holds the torch.compile time, and then --repeats timed passes, of which the best counts.
pymatting runs `estimate_alpha_cf` with one process per core (NUMBA_NUM_THREADS and the BLAS
threads set to 1) on --cpu-photos photos. It is timed from the first task to the last result,
after a warm-up that loads its numba cache. The alpha MAD column compares the two on the photos
both solved.

    python benchmarks/bench_matting.py --out $OUT/bench_matting.json         # GPU machine
    python benchmarks/bench_matting.py --sizes 96 --photos 8 --cpu-photos 4 \\
        --batch-sizes 4 --tols 1e-4 --workers 2                             # CPU-only sanity

Without CUDA the torch rows run on the CPU, uncompiled. They only check that the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from machine import describe  # noqa: E402

import stages.matting.alpha as matting_alpha  # noqa: E402
import stages.matting.cg as matting_cg  # noqa: E402
import stages.matting.laplacian as matting_laplacian  # noqa: E402
from stages.matting import BG_THRESHOLD, FG_THRESHOLD, estimate_alpha_cf_torch, estimate_foreground_torch  # noqa: E402
from stages.matting._kernels import COMPILED, EAGER, kernel_choice  # noqa: E402
from tests.matting_fixtures import ellipse_trimap  # noqa: E402

PHOTOS = REPO / "datasets" / "dreambench-mini"
DEFAULT_TOL = inspect.signature(estimate_alpha_cf_torch).parameters["tol"].default
SINGLE_THREADED = {k: "1" for k in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}

log = logging.getLogger("bench_matting")


def load_photos(size: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, size, size, 3) float32 photos, cycling DreamBench-mini, and their trimaps."""
    files = sorted(PHOTOS.glob("*/*.jpg"))
    if not files:
        raise SystemExit(f"no photos under {PHOTOS}")
    photos = []
    for path in files[: min(count, len(files))]:
        photo = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        photos.append(np.asarray(photo, dtype=np.float32) / 255.0)
    images = np.stack([photos[i % len(photos)] for i in range(count)])
    # Inner and outer radii chosen for ~25% unknown pixels.
    trimaps = np.broadcast_to(ellipse_trimap(size, size, inner=0.33, outer=0.45), images.shape[:3]).copy()
    return images, trimaps


class IterationLog(logging.Handler):
    """Collects (height, CG iterations) from the solver's DEBUG line for each pyramid level. A
    level's count is its batch's slowest photo. The table shows the mean over the batches at
    full size."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.levels: list[tuple[int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.args and len(record.args) == 4:
            _, height, _, iterations = record.args
            self.levels.append((int(height), int(iterations)))


@contextlib.contextmanager
def _float32_coefficients(on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    from stages.matting import cg_triton

    before = cg_triton.COEFFICIENT_DTYPE
    cg_triton.COEFFICIENT_DTYPE = torch.float32
    try:
        yield
    finally:
        cg_triton.COEFFICIENT_DTYPE = before


def time_torch(
    images: torch.Tensor,
    trimaps: torch.Tensor,
    batch: int,
    tol: float,
    repeats: int,
    iterations: IterationLog,
    cg: str = "auto",
) -> dict:
    """Warm-up pass, then the best of `repeats` timed passes over all photos in batches."""

    # "triton-graphs-f32coef": the Triton loop reading its coefficients as float32, the same
    # values in twice the bytes (the library switches that by a module constant, not by `cg`).
    wide = cg.endswith("-f32coef")
    cg = cg.removesuffix("-f32coef")

    def run_all() -> tuple[float, torch.Tensor]:
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with _float32_coefficients(wide):
            alphas = [
                estimate_alpha_cf_torch(images[i : i + batch], trimaps[i : i + batch], tol=tol, cg=cg)
                for i in range(0, len(images), batch)
            ]
        if images.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cat(alphas)

    warm_start = time.perf_counter()
    run_all()
    warm_up_s = time.perf_counter() - warm_start
    times = []
    iterations.levels.clear()
    for _ in range(repeats):
        seconds, alphas = run_all()
        times.append(seconds)
    size = images.shape[1]
    fine = [n for h, n in iterations.levels if h == size]
    return {
        "photos": len(images),
        "batch": batch,
        "tol": tol,
        "cg": kernel_choice().resolve_cg(cg, images) + ("-f32coef" if wide else ""),
        "best_s": min(times),
        "photos_per_s": len(images) / min(times),
        "warm_up_s": warm_up_s,
        "mean_fine_cg_iterations": float(np.mean(fine)) if fine else None,
        "alphas": alphas,
    }


@contextlib.contextmanager
def single_threaded_children() -> Iterator[None]:
    """Processes spawned inside inherit one thread each for numba and BLAS. This process keeps
    its own settings."""
    saved = {k: os.environ.get(k) for k in SINGLE_THREADED}
    os.environ.update(SINGLE_THREADED)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_ready: object = None  # each pymatting worker's start barrier


def _warm_pymatting(barrier: object = None) -> None:
    """Compile (first run on a machine) or load pymatting's numba kernels in this process."""
    global _ready
    _ready = barrier
    from pymatting import estimate_alpha_cf, estimate_foreground_ml

    image = np.random.default_rng(0).uniform(size=(24, 24, 3))
    alpha = estimate_alpha_cf(image, ellipse_trimap(24, 24).astype(np.float64))
    estimate_foreground_ml(image.astype(np.float32), alpha.astype(np.float32))


def _wait_until_all_ready(_: int) -> None:
    # A worker waiting here takes no other task, so `workers` of these reach every worker.
    _ready.wait()


def _pymatting_alpha(task: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    from pymatting import estimate_alpha_cf

    image, trimap = task
    return estimate_alpha_cf(image.astype(np.float64), trimap.astype(np.float64)).astype(np.float32)


def _pymatting_foreground(task: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    from pymatting import estimate_foreground_ml

    image, alpha = task
    return estimate_foreground_ml(image, alpha)


def time_pymatting(pool: mp.pool.Pool, fn, tasks: list) -> tuple[float, list]:
    """Wall clock from the first task handed out to the last result back."""
    start = time.perf_counter()
    results = pool.map(fn, tasks, chunksize=1)
    return time.perf_counter() - start, results


def time_torch_foreground(
    images: np.ndarray, alphas: np.ndarray, device: torch.device, batch: int, compile: bool | None = None
) -> tuple[float, np.ndarray]:
    img = torch.from_numpy(images).to(device)
    alp = torch.from_numpy(alphas).to(device)
    estimate_foreground_torch(img[:batch], alp[:batch], compile=compile)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    ours = torch.cat(
        [
            estimate_foreground_torch(img[i : i + batch], alp[i : i + batch], compile=compile)
            for i in range(0, len(img), batch)
        ]
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, ours.cpu().numpy()


def profile_solve(images: torch.Tensor, trimaps: torch.Tensor, batch: int, torch_loop: bool = True) -> dict:
    """Where a full-size solve's time goes, for one batch: stencil build, compaction, and CG
    iterations (200, none converging, so the batch never shrinks)."""
    kernels = matting_alpha._kernels_for(COMPILED if images.is_cuda else EAGER)
    image = images[:batch].permute(0, 3, 1, 2).float()
    trimap = trimaps[:batch].unsqueeze(1).float()
    fg = (trimap >= FG_THRESHOLD).float()
    free = ((trimap > BG_THRESHOLD) & (trimap < FG_THRESHOLD)).float()

    def timed(fn):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if images.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    kernels.build_stencil(image, None, 1e-7, 1)  # warm-up
    build_s, stencil = timed(lambda: kernels.build_stencil(image, None, 1e-7, 1))
    compact_s, (system, rhs) = timed(lambda: matting_laplacian.compact_system(stencil, free, fg, torch.float32))
    steps = 200
    result = {
        "batch": batch,
        "unknown_pixels_per_photo": float(free.sum()) / batch,
        "build_ms_per_photo": 1e3 * build_s / batch,
        "compact_ms_per_photo": 1e3 * compact_s / batch,
    }
    if torch_loop:  # the compiled torch step (its compile takes ~50 s on a fresh machine)
        x0 = torch.zeros_like(rhs)
        matting_cg.solve_pcg(system, rhs, x0, 0.0, 10, steps, kernels.cg_step)  # warm-up
        cg_s, _ = timed(lambda: matting_cg.solve_pcg(system, rhs, x0, 0.0, steps, steps, kernels.cg_step))
        coef_bytes = system.coef.numel() * system.coef.element_size()
        result["cg_us_per_photo_iteration"] = 1e6 * cg_s / steps / batch
        result["coef_read_gb_per_s"] = coef_bytes * steps / cg_s / 1e9
    if images.is_cuda:
        result.update(profile_triton(system, rhs, image.shape[-1], steps, timed))
    return result


def profile_triton(system, rhs: torch.Tensor, width: int, steps: int, timed) -> dict:
    """The Triton CG iteration on the same system, tol 0 so no photo stops: launched one by one,
    and replayed from a CUDA graph of 16 iterations; coefficients read as float16 (the default)
    and as float32 (the same values, twice the bytes)."""
    from stages.matting.cg_triton import TritonPCG

    reach = (int(system.offsets.numel() ** 0.5) - 1) // 2
    batch = rhs.shape[0]

    def solver(coefficient_dtype: torch.dtype) -> TritonPCG:
        x0 = torch.zeros_like(rhs)
        s = system
        args = (s.coef, s.inv_diag, s.index, s.counts, s.scratch_size, width + 2 * reach, rhs, x0, rhs, 0.0)
        return TritonPCG(*args, coefficient_dtype=coefficient_dtype)

    def replay(graph: torch.cuda.CUDAGraph, times: int) -> None:
        for _ in range(times):
            graph.replay()

    result = {}
    for coefficient_dtype in (torch.float16, torch.float32):
        name = "triton" if coefficient_dtype == torch.float16 else "triton_f32coef"
        launched = solver(coefficient_dtype)
        launched.iterate(2)  # compiles the kernels
        launched_s, _ = timed(functools.partial(launched.iterate, steps))
        replayed = solver(coefficient_dtype)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed.iterate(16)
        graph_s, _ = timed(functools.partial(replay, graph, steps // 16))
        result[f"{name}_cg_us_per_photo_iteration"] = 1e6 * launched_s / steps / batch
        result[f"{name}_graphs_cg_us_per_photo_iteration"] = 1e6 * graph_s / (16 * (steps // 16)) / batch
        del launched, replayed, graph
    return result


def markdown(rows: list[dict]) -> str:
    lines = [
        "| solver | device | size | batch | tol | photos | photos/s | ms/photo | CG iterations at full size | alpha MAD vs pymatting |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        iters = f"{r['mean_fine_cg_iterations']:.0f}" if r.get("mean_fine_cg_iterations") else "-"
        mad = f"{r['mad_vs_pymatting']:.5f}" if r.get("mad_vs_pymatting") is not None else "-"
        lines.append(
            f"| {r['solver']} | {r['device']} | {r['size']} | {r.get('batch', '-')} | {r.get('tol', '-')} | {r['photos']} "
            f"| {r['photos_per_s']:.1f} | {1000 / r['photos_per_s']:.2f} | {iters} | {mad} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--photos", type=int, default=128, help="photos per size for torch")
    parser.add_argument("--cpu-photos", type=int, default=None, help="photos per size for pymatting (2 per worker)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--tols", type=float, nargs="*", default=[1e-4, 1e-5], help="extra tols at the best batch")
    parser.add_argument(
        "--cgs", nargs="*", default=["torch", "triton"], help="CG loops to compare at the best batch, beside auto"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-torch-profile", action="store_true", help="profile the Triton loops only")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--budget", type=float, default=400.0, help="seconds; optional rows are skipped past it")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    started = time.perf_counter()
    cpu_photos = args.cpu_photos or 2 * args.workers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64  # batch shrinking and pyramid levels change shapes

    ctx = mp.get_context("spawn")
    warm = ctx.Process(target=_warm_pymatting)
    with single_threaded_children():
        warm.start()  # the numba compile (~1 min on a fresh machine) overlaps the GPU work
    pool = None

    iterations = IterationLog()
    matting_alpha.logger.addHandler(iterations)
    matting_alpha.logger.setLevel(logging.DEBUG)
    report = {
        "hardware": describe("pymatting"),
        "command": " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": [],
    }
    rows = report["rows"]

    def save() -> None:  # after every row, so a run cut short still leaves its numbers
        report["wall_s"] = time.perf_counter() - started
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))

    def over_budget() -> bool:
        return time.perf_counter() - started > args.budget

    for size in args.sizes:
        images_np, trimaps_np = load_photos(size, args.photos)
        images = torch.from_numpy(images_np).to(device)
        trimaps = torch.from_numpy(trimaps_np).to(device)
        log.info("size %d: %.1f%% unknown", size, 100 * float(((trimaps > 0.1) & (trimaps < 0.9)).float().mean()))
        # The compile, out of the timings. Two photos, not one: dynamo specialises a batch of 1,
        # and the first real batch would compile everything again (measured: 50 s twice).
        estimate_alpha_cf_torch(images[:2], trimaps[:2])
        best_row, best_alphas = None, None
        for batch in args.batch_sizes:
            if best_row is not None and over_budget():
                log.warning("budget spent: skipping torch batch %d at %d", batch, size)
                break
            try:
                result = time_torch(images, trimaps, batch, DEFAULT_TOL, args.repeats, iterations)
            except Exception:  # e.g. out of memory at a large batch: record it, keep the others
                log.exception("torch batch %d at %d failed", batch, size)
                rows.append(
                    {
                        "solver": "torch (failed)",
                        "device": device.type,
                        "size": size,
                        "batch": batch,
                        "photos": 0,
                        "photos_per_s": float("nan"),
                    }
                )
                continue
            alphas = result.pop("alphas")
            rows.append({"solver": f"torch, cg {result['cg']}", "device": device.type, "size": size, **result})
            log.info("torch %s size %d batch %d: %.1f photos/s", device.type, size, batch, result["photos_per_s"])
            if best_row is None or result["photos_per_s"] > best_row["photos_per_s"]:
                best_row, best_alphas = rows[-1], alphas.cpu().numpy()
            save()

        if best_row is not None and not over_budget():
            try:
                report.setdefault("profile", {})[size] = profile = profile_solve(
                    images, trimaps, best_row["batch"], torch_loop=not args.no_torch_profile
                )
                log.info("profile %d px: %s", size, profile)
            except Exception:
                log.exception("profile at %d failed", size)
            save()

        if pool is None:
            warm.join()
            barrier = ctx.Barrier(args.workers)
            with single_threaded_children():
                pool = ctx.Pool(args.workers, initializer=_warm_pymatting, initargs=(barrier,))
            pool.map(_wait_until_all_ready, range(args.workers), chunksize=1)
        cpu_images, cpu_trimaps = load_photos(size, cpu_photos)
        seconds, alphas = time_pymatting(pool, _pymatting_alpha, list(zip(cpu_images, cpu_trimaps, strict=True)))
        reference = np.stack(alphas)
        rows.append(
            {
                "solver": f"pymatting, {args.workers} processes",
                "device": "cpu",
                "size": size,
                "photos": cpu_photos,
                "photos_per_s": cpu_photos / seconds,
                "best_s": seconds,
            }
        )
        log.info("pymatting size %d: %.2f photos/s", size, cpu_photos / seconds)
        save()
        if best_row is None:
            continue
        # Photo i is the same photo in both runs (both cycle the same list).
        n = min(cpu_photos, len(best_alphas))
        mad = np.abs(best_alphas[:n] - reference[:n]).mean(axis=(1, 2))
        best_row["mad_vs_pymatting"] = float(mad.mean())
        best_row["max_photo_mad_vs_pymatting"] = float(mad.max())
        save()

        # The other CG loops on the same batches (the torch loop is the baseline the Triton
        # kernels replace), then other tolerances with the default loop.
        variants = [(DEFAULT_TOL, cg) for cg in args.cgs if cg != best_row["cg"]]
        for tol, cg in [*variants, *((tol, "auto") for tol in args.tols)]:
            if over_budget():
                log.warning("budget spent: skipping tol %g, cg %s at %d", tol, cg, size)
                break
            try:
                result = time_torch(images, trimaps, best_row["batch"], tol, args.repeats, iterations, cg=cg)
            except Exception:
                log.exception("torch tol %g, cg %s at %d failed", tol, cg, size)
                continue
            alphas = result.pop("alphas").cpu().numpy()
            mad = np.abs(alphas[:n] - reference[:n]).mean(axis=(1, 2))
            rows.append(
                {
                    "solver": f"torch, cg {result['cg']}",
                    "device": device.type,
                    "size": size,
                    **result,
                    "mad_vs_pymatting": float(mad.mean()),
                    "max_photo_mad_vs_pymatting": float(mad.max()),
                    "max_abs_diff_vs_best_row": float(np.abs(alphas - best_alphas).max()),
                }
            )
            log.info("torch %s size %d cg %s tol %g: %.1f photos/s", device.type, size, cg, tol, result["photos_per_s"])
            save()

        if size == args.sizes[0] and not over_budget():
            # Foreground from pymatting's alphas, for both.
            seconds, fgs = time_pymatting(pool, _pymatting_foreground, list(zip(cpu_images, reference, strict=True)))
            rows.append(
                {
                    "solver": f"pymatting foreground, {args.workers} processes",
                    "device": "cpu",
                    "size": size,
                    "photos": cpu_photos,
                    "photos_per_s": cpu_photos / seconds,
                    "best_s": seconds,
                }
            )
            batch = 32
            for compiled in (False, None) if device.type == "cuda" else (None,):
                seconds, ours = time_torch_foreground(cpu_images, reference, device, batch, compile=compiled)
                weight = reference[..., None]
                fg_mad = float((np.abs(ours - np.stack(fgs)) * weight).sum() / (3 * weight.sum()))
                rows.append(
                    {
                        "solver": "torch foreground" + (", eager" if compiled is False else ""),
                        "device": device.type,
                        "size": size,
                        "batch": batch,
                        "photos": cpu_photos,
                        "photos_per_s": cpu_photos / seconds,
                        "best_s": seconds,
                        "alpha_weighted_fg_mad_vs_pymatting": fg_mad,
                    }
                )
                save()
        del images, trimaps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if pool is not None:
        pool.close()

    save()
    hw = report["hardware"]
    print(
        f"\nGPU: {hw['gpu']}; CPU: {hw['cpu']} x {hw['cpu_count']}; torch {hw['torch']}, pymatting {hw['pymatting']}, Python {hw['python']}"
    )
    print(f"date: {report['date']}; command: {report['command']}; wall {report['wall_s']:.0f} s\n")
    print(markdown(rows))
    for size, profile in report.get("profile", {}).items():
        print(f"profile {size} px: " + ", ".join(f"{k} {v:.4g}" for k, v in profile.items()))
    for row in rows:
        if "max_photo_mad_vs_pymatting" in row:
            print(
                f"torch {row['size']} px, batch {row['batch']}, tol {row['tol']:g}: mean / worst photo alpha MAD vs pymatting {row['mad_vs_pymatting']:.5f} / {row['max_photo_mad_vs_pymatting']:.5f}"
            )
        if "alpha_weighted_fg_mad_vs_pymatting" in row:
            print(
                f"foreground {row['size']} px: alpha-weighted MAD vs pymatting {row['alpha_weighted_fg_mad_vs_pymatting']:.4f}"
            )


if __name__ == "__main__":
    main()
