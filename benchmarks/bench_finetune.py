"""Time to fine-tune one subject, and subjects per hour per GPU (issue 6's targets).

Step modes run the fine-tuning method's own training step (pipeline/train/methods.py, the
loop's math: VAE-encode the target, noise, predict, MSE, backward, clip, fused AdamW) in one
process on one GPU, bf16 autocast, batch 3, 512 px:

    python benchmarks/bench_finetune.py --real --out results.json            # GPU, random weights
    python benchmarks/bench_finetune.py --model Salesforce/blipdiffusion ...  # released weights
    python benchmarks/bench_finetune.py --tiny --size 64 --steps 3            # CPU smoke test
    python benchmarks/bench_finetune.py --model ... --e2e --subjects 8        # the real jobs

For each method (--methods, default blipd,lora): load_s (the base from disk, the subject's
mean embedding, to the GPU), then per UNet mode (--modes) the seconds of --steps optimizer
steps after --warmup (eager: --eager-steps, scaled to --steps), then save_s and the artifact's
bytes. UNet modes: eager; graphs (train.cuda_graphs: forward and backward as CUDA graphs,
first_step_s holds the capture); compiled and reduce-overhead (torch.compile default / with
CUDA graphs; minutes of compilation, in warmup_s). `--real` builds real-sized random weights
(SD 1.5 UNet and VAE, CLIP ViT-L text encoder, BLIP-2 ViT-L/14 and Q-Former) and saves them
once as the base, so load_s reads 1.5B float32 parameters from disk like a real base.

--concurrent K runs K one-subject jobs at once on the GPU, each in its own process (load, --steps
graphed steps, save; finetune-many's num_gpus=1/K without Ray): subjects/hour/GPU = K x 3600 /
wall. Registration (MLflow) is not in these numbers; --e2e runs the real commands:
`finetune_subject` (Ray Train, 1 worker; plus registration with --tracking-uri) for one subject
per method, and `finetune_many` over --subjects subjects with --num-gpus per subject.

--many runs only `finetune_many` (the real path: a pool of --concurrency Ray actors, each with
--num-gpus of a GPU, keeping the base between subjects) over --subjects synthetic subjects
(4 photos each, --size px) with --method (lora), registration off:

    python benchmarks/bench_finetune.py --real --many --subjects 8 --concurrency 2 --num-gpus 0.5
    python benchmarks/bench_finetune.py --tiny --many --size 32 --steps 3 --subjects 3   # CPU smoke

It reports the wall time of finetune_many after Ray started (actor starts and each actor's
first base load included), subjects/h/GPU from it, and each subject's seconds and base loads
(0: its actor's kept base served it); `steady_subjects_per_hour_per_gpu` is the rate once every
actor holds its base (concurrency x 3600 / mean seconds of those subjects, per GPU).
Targets: blipd 100 steps <= 15 s on an H100 after load; LoRA artifact <= 50 MB; lora >= 200
subjects/hour/GPU.

--memory measures the memory options (issue 21): for each method of --methods (blipd,dreambooth
on the command below) and each combination of train.gradient_checkpointing (off, on),
train.optimizer (adamw, adamw8bit) and finetune.train_text_encoder (off, on), a fresh load of the
base, --warmup steps, then --eager-steps timed eager steps (the loop turns CUDA graphs off with
checkpointing, so every row is eager): peak_allocated_gib / peak_reserved_gib (the base, the
optimizer state and the step's activations; torch.cuda max_memory_*), s_per_100_steps, and
fits_gb, the card sizes (16, 24, 40 GB) whose memory holds peak_reserved plus CUDA_CONTEXT_GIB:

    python benchmarks/bench_finetune.py --real --memory --methods blipd,dreambooth --eager-steps 20 --out memory.json
    python benchmarks/bench_finetune.py --memory --smoke                                        # CPU check

--smoke is the tiny model at 64 px, batch 2, one warm-up and 2 timed steps (adamw8bit rows
record the error without bitsandbytes). A combination that runs out of memory is a row with
its error.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_pretrain import apply_update  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.train.losses import add_noise, diffusion_target, sample_latents, sample_timesteps  # noqa: E402
from pipeline.train.memory import build_optimizer, enable_gradient_checkpointing  # noqa: E402
from pipeline.train.methods import REFERENCES_FOLDER, get_method  # noqa: E402
from pipeline.train.speed import GraphedUNet  # noqa: E402
from stages.train_inputs import latent_params  # noqa: E402

log = logging.getLogger("bench_finetune")


def _photos(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def save_real_base(folder: Path) -> str:
    """Real-sized random BLIP-Diffusion weights saved as a base checkpoint (float32)."""
    from bench_pretrain import build_real

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    build_real(device).save_pretrained(folder)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return str(folder)


def _config(args: argparse.Namespace, method_name: str, work: Path, extra: list[str] | None = None):
    _photos(work / REFERENCES_FOLDER, 4, args.size)
    overrides = [f"train.data={work}", f"train.resolution={args.size}", f"finetune.method={method_name}",
                 f"train.method={method_name}", "finetune.subject_id=bench", "finetune.category=dog", *(extra or [])]
    overrides += ["profile=tiny"] if args.tiny else [f"models.blip_diffusion={args.model}"]
    return load_config(overrides=overrides)


def make_step(method, config, args: argparse.Namespace, device: torch.device, graphs: bool):
    """One optimizer step of the loop for a fine-tune (batch args.batch, fresh AdamW)."""
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.train.model_copy(update={"lr": config.finetune.learning_rate(), "weight_decay": 0.01}), device)
    alphas = method.model.scheduler.alphas_cumprod.to(device)
    scaling = method.model.vae.config.scaling_factor
    bf16 = device.type == "cuda"
    targets = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    categories = ["dog"] * args.batch
    prompts = method.build_prompts(categories, [""] * args.batch)
    channels_last = method.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and device.type == "cuda"

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphs):
            latents = sample_latents(latent_params(method.model.vae, targets), scaling)
            if channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            noise = torch.randn_like(latents)
            t = sample_timesteps(args.batch, len(alphas), device)
            pred = method(None, categories, prompts, add_noise(latents, noise, t, alphas), t, None)
            loss = method.loss(pred, diffusion_target(latents, noise, t, alphas, "epsilon"))
        return apply_update(loss, params, optimizer)

    return step


def time_mode(method, config, args: argparse.Namespace, device: torch.device, mode: str) -> dict:
    """Seconds per 100 steps of one UNet mode on a loaded method."""
    method.graphed_unet = GraphedUNet(method.model.unet) if mode == "graphs" and device.type == "cuda" else None
    if mode in ("compiled", "reduce-overhead"):
        method.model.unet.to(memory_format=torch.channels_last).compile(mode=None if mode == "compiled" else mode)
    step = make_step(method, config, args, device, graphs=method.graphed_unet is not None)
    start = time.perf_counter()
    loss = step()
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        loss = step()
    _sync(device)
    warm = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{mode}: loss {loss.item()}")
    steps = args.eager_steps if mode == "eager" else args.steps
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    return {"unet": mode, "first_step_s": round(first, 2), "warmup_s": round(warm, 2), "timed_steps": steps,
            "ms_per_step": round(1000 * seconds / steps, 1), "s_per_100_steps": round(100 * seconds / steps, 2)}


def bench_method(args: argparse.Namespace, method_name: str, work: Path, t0: float) -> list[dict]:
    """Load once, time each UNet mode in --modes, save once."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = _config(args, method_name, work)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    method = get_method(method_name).load(config).to(device)
    _sync(device)
    load_s = time.perf_counter() - start
    method.trainable_parameters()
    method.train()
    common = {"method": method_name, "batch": args.batch, "size": args.size, "load_s": round(load_s, 2),
              "trainable_m": round(sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6, 2)}
    rows = []
    for mode in args.modes.split(","):
        if time.perf_counter() - t0 > args.budget:
            rows.append({**common, "unet": mode, "skipped": "budget"})
            continue
        try:
            row = {**common, **time_mode(method, config, args, device, mode)}
        except Exception as exc:  # one mode failing on the GPU must not cost the other rows
            log.exception("%s %s failed", method_name, mode)
            rows.append({**common, "unet": mode, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        row["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
        print(json.dumps(row), flush=True)
        rows.append(row)
    start = time.perf_counter()
    method.save(work / "ckpt")
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (work / "ckpt").rglob("*") if p.is_file())
    timed = [r for r in rows if "s_per_100_steps" in r]
    best = min(timed, key=lambda r: r["s_per_100_steps"]) if timed else None
    for row in rows:
        row.update(save_s=round(save_s, 2), artifact_bytes=size)
    if best is not None:  # one subject after another on a GPU, without Ray's start or registration
        one = load_s + best["s_per_100_steps"] * args.steps / 100 + best["first_step_s"] + save_s
        rows.append({"method": method_name, "estimate": "serial", "unet": best["unet"], "seconds_per_subject": round(one, 1),
                     "subjects_per_hour_per_gpu": round(3600 / one, 1)})
    return rows


CARDS_GB = (16, 24, 40)
CUDA_CONTEXT_GIB = 0.6  # what the CUDA context and cuBLAS workspaces hold outside torch's allocator


def bench_memory(args: argparse.Namespace, method_name: str, work: Path) -> list[dict]:
    """One row per memory option combination: a fresh base on the device, then eager steps."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for checkpointing in (False, True):
        for optimizer in ("adamw", "adamw8bit"):
            for text_encoder in (choice == "on" for choice in args.text_encoder.split(",")):
                row = {"method": method_name, "gradient_checkpointing": checkpointing, "optimizer": optimizer,
                       "train_text_encoder": text_encoder, "batch": args.batch, "size": args.size}
                extra = [f"train.optimizer={optimizer}", f"finetune.train_text_encoder={text_encoder}"]
                try:
                    row.update(_memory_row(args, _config(args, method_name, work, extra), method_name, device, checkpointing))
                except Exception as exc:  # out of memory, or no bitsandbytes: a row with its error
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def _memory_row(args: argparse.Namespace, config, method_name: str, device: torch.device, checkpointing: bool) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    method = get_method(method_name).load(config).to(device)
    method.trainable_parameters()
    method.train()
    if checkpointing:
        enable_gradient_checkpointing(method.model.unet, method.model.text_encoder)
    step = make_step(method, config, args, device, graphs=False)
    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.eager_steps):
        loss = step()
    _sync(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()}")
    row = {"trainable_m": round(sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6, 1),
           "s_per_100_steps": round(100 * seconds / args.eager_steps, 2)}
    if device.type == "cuda":
        allocated, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
        row.update(peak_allocated_gib=round(allocated, 2), peak_reserved_gib=round(reserved, 2),
                   fits_gb=[gb for gb in CARDS_GB if reserved + CUDA_CONTEXT_GIB <= gb * 1e9 / 2**30])
    del method, step
    return row


def one_subject(args: argparse.Namespace) -> None:
    """--single: load, --steps graphed steps (capture included), save; prints its seconds."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        config = _config(args, args.single, Path(tmp))
        method = get_method(args.single).load(config).to(device)
        method.trainable_parameters()
        method.train()
        method.graphed_unet = GraphedUNet(method.model.unet) if device.type == "cuda" else None
        step = make_step(method, config, args, device, graphs=method.graphed_unet is not None)
        for _ in range(args.steps):
            step()
        _sync(device)
        method.save(Path(tmp) / "ckpt")
        print(json.dumps({"single": args.single, "seconds": round(time.perf_counter() - start, 2)}), flush=True)


def bench_concurrent(args: argparse.Namespace, method_name: str, count: int) -> dict:
    """`count` one-subject processes at once; subjects/hour/GPU from the wall clock."""
    cmd = [sys.executable, __file__, "--single", method_name, "--model", args.model, "--steps", str(args.steps),
           "--batch", str(args.batch), "--size", str(args.size)] + (["--tiny"] if args.tiny else [])
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy()) for _ in range(count)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - start
    ok = sum(p.returncode == 0 for p in procs)
    each = [json.loads(line)["seconds"] for out in outs for line in out.splitlines() if line.startswith('{"single"')]
    return {"method": method_name, "estimate": "concurrent", "processes": count, "ok": ok, "wall_s": round(wall, 1),
            "per_process_s": each, "subjects_per_hour_per_gpu": round(ok * 3600 / wall, 1)}


def bench_e2e(args: argparse.Namespace, work: Path) -> list[dict]:
    from pipeline.train.finetune import finetune_subject
    from pipeline.train.many import finetune_many
    from tests.tinydata import publish_dataset

    subjects = {f"s{i:03d}": "dog" for i in range(args.subjects)}
    publish_dataset(work / "ds", subjects, per_subject=4, size=(args.size, args.size))
    gpu = torch.cuda.is_available()
    # Training time alone: validation (DINO and CLIP, maybe not on the benchmark machine) is off.
    common = [f"finetune.subject={work / 'ds'}", f"finetune.steps={args.steps}", f"train.resolution={args.size}",
              "finetune.validate_every=0", "finetune.select=last",
              f"train.gpu={str(gpu).lower()}", f"finetune.out={work / 'out'}", f"train.storage_path={work / 'runs'}"]
    common += ["profile=tiny"] if args.tiny else [f"models.blip_diffusion={args.model}"]
    common += [f"tracking.uri={args.tracking_uri}"] if args.tracking_uri else ["tracking.enabled=false"]
    rows = []
    for method in args.methods.split(","):
        config = load_config(overrides=[*common, f"finetune.method={method}", "finetune.subject_id=s000"])
        result = finetune_subject(config)
        rows.append({"mode": "finetune", "method": method, "seconds": round(result.seconds, 1), "artifact_bytes": result.artifact_bytes})
        config = load_config(overrides=[*common, f"finetune.method={method}", f"finetune.num_gpus={args.num_gpus}",
                                        f"finetune.concurrency={max(1, int(1 / args.num_gpus))}"])
        start = time.perf_counter()
        outcomes = finetune_many(config)
        seconds = time.perf_counter() - start
        ok = sum(o.status == "ok" for o in outcomes)
        rows.append({"mode": "finetune-many", "method": method, "subjects": len(outcomes), "ok": ok, "seconds": round(seconds, 1),
                     "subjects_per_hour_per_gpu": round(ok / seconds * 3600, 1)})
    return rows


def bench_many(args: argparse.Namespace, work: Path, method: str) -> dict:
    """finetune_many over args.subjects subjects on a pool of args.concurrency actors."""
    import math

    from pipeline.raycluster import ensure_ray
    from pipeline.train.many import finetune_many
    from tests.tinydata import publish_dataset

    subjects = {f"s{i:03d}": "dog" for i in range(args.subjects)}
    publish_dataset(work / "ds", subjects, per_subject=4, size=(args.size, args.size))
    gpu = torch.cuda.is_available()
    overrides = [f"finetune.subject={work / 'ds'}", f"finetune.method={method}", f"finetune.steps={args.steps}",
                 "finetune.validate_every=0", "finetune.select=last",  # training time alone, as before validation
                 f"finetune.batch_size={args.batch}", f"train.resolution={args.size}", f"train.gpu={str(gpu).lower()}",
                 f"finetune.num_gpus={args.num_gpus}", f"finetune.concurrency={args.concurrency}",
                 f"train.cpus_per_worker={args.cpus_per_worker}", f"finetune.out={work / 'out'}",
                 f"train.storage_path={work / 'runs'}", "tracking.enabled=false"]
    overrides += ["profile=tiny"] if args.tiny else [f"models.blip_diffusion={args.model}"]
    config = load_config(overrides=overrides)
    start = time.perf_counter()
    ensure_ray(config.ray)
    ray_s = time.perf_counter() - start
    start = time.perf_counter()
    outcomes = finetune_many(config)
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.status == "ok"]
    gpus = math.ceil(args.concurrency * args.num_gpus - 1e-9) if gpu else 1
    kept = [o.seconds for o in ok if o.base_loads == 0]
    steady = args.concurrency * 3600 / (sum(kept) / len(kept)) / gpus if kept else None
    return {"mode": "finetune-many", "method": method, "subjects": len(outcomes), "ok": len(ok), "concurrency": args.concurrency,
            "num_gpus": args.num_gpus, "gpus": gpus, "ray_start_s": round(ray_s, 1), "wall_s": round(wall, 1),
            "subjects_per_hour_per_gpu": round(len(ok) * 3600 / wall / gpus, 1),
            "steady_subjects_per_hour_per_gpu": round(steady, 1) if steady else None,
            "per_subject": [{"subject": o.subject_id, "status": o.status, "s": round(o.seconds, 1), "base_loads": o.base_loads,
                             "error": o.error[:200]} for o in outcomes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Salesforce/blipdiffusion")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight model (CPU smoke test)")
    parser.add_argument("--real", action="store_true", help="real-sized random weights, saved once as the base")
    parser.add_argument("--methods", default="blipd,lora")
    parser.add_argument("--modes", default="eager,graphs", help="UNet modes: eager, graphs, compiled, reduce-overhead")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eager-steps", type=int, default=100, help="timed eager steps (scaled to --steps)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--concurrent", type=int, default=0, help="also K lora subjects at once, one process each")
    parser.add_argument("--budget", type=float, default=400.0, help="start no new mode after this many s")
    parser.add_argument("--single", help=argparse.SUPPRESS)  # a --concurrent child
    parser.add_argument("--e2e", action="store_true", help="also time the real finetune and finetune-many jobs")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--num-gpus", type=float, default=0.25, help="GPUs per subject (finetune.num_gpus)")
    parser.add_argument("--many", action="store_true", help="time finetune_many alone (actors keeping the base)")
    parser.add_argument("--concurrency", type=int, default=1, help="--many: actors (finetune.concurrency)")
    parser.add_argument("--method", default="lora", help="--many: finetune.method")
    parser.add_argument("--cpus-per-worker", type=float, default=2.0, help="--many: CPUs per actor (train.cpus_per_worker)")
    parser.add_argument("--text-encoder", default="off,on", help="--memory: finetune.train_text_encoder settings to run")
    parser.add_argument("--memory", action="store_true", help="peak memory and s/100 steps of each memory option combination")
    parser.add_argument("--smoke", action="store_true", help="CPU check: tiny model, 64 px, batch 2, 1 warm-up and 2 timed steps")
    parser.add_argument("--tracking-uri")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.smoke:
        args.tiny, args.real, args.size, args.batch, args.warmup, args.eager_steps = True, False, 64, 2, 1, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.single:
        one_subject(args)
        return

    t0 = time.perf_counter()
    results = []
    if args.many:
        with tempfile.TemporaryDirectory() as tmp:
            if args.real:
                start = time.perf_counter()
                args.model = save_real_base(Path(tmp) / "base")
                results.append({"real_base_saved_s": round(time.perf_counter() - start, 1)})
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the actors need the memory building the base took
            results.append(bench_many(args, Path(tmp), args.method))
            print(json.dumps(results[-1]), flush=True)
        _write(args, results)
        return
    with tempfile.TemporaryDirectory() as base:
        if args.real:
            start = time.perf_counter()
            args.model = save_real_base(Path(base) / "base")
            results.append({"real_base_saved_s": round(time.perf_counter() - start, 1)})
        if args.memory:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # building the base must not count in the first row's peak
            for method in [m for m in args.methods.split(",") if m]:
                with tempfile.TemporaryDirectory() as tmp:
                    results += bench_memory(args, method, Path(tmp))
                _write(args, results)
            return
        for method in [m for m in args.methods.split(",") if m]:  # --methods "": concurrency alone
            with tempfile.TemporaryDirectory() as tmp:
                results += bench_method(args, method, Path(tmp), t0)
            print(json.dumps(results[-1]), flush=True)
            _write(args, results)
        gc.collect()  # the children need the GPU memory this process cached
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if args.concurrent and time.perf_counter() - t0 < args.budget:
            for count in (1, args.concurrent):
                results.append(bench_concurrent(args, "lora", count))
                print(json.dumps(results[-1]), flush=True)
                _write(args, results)
    if args.e2e:
        with tempfile.TemporaryDirectory() as tmp:
            for row in bench_e2e(args, Path(tmp)):
                print(json.dumps(row))
                results.append(row)
    _write(args, results)


def _write(args: argparse.Namespace, results: list[dict]) -> None:
    meta = {"date": datetime.now(timezone.utc).isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "model": "tiny" if args.tiny else "real-size random" if args.real else args.model,
            "settings": {k: str(v) for k, v in vars(args).items()}}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
