"""Time to fine-tune one subject, and subjects per hour per GPU (issue 6's targets).

Step modes run the fine-tuning method's own training step (pipeline/train/methods.py, the
loop's math: VAE-encode the target, noise, predict, MSE, backward, clip, fused AdamW) in one
process on one GPU, bf16 autocast, batch 3, 512 px:

    python benchmarks/bench_finetune.py --model Salesforce/blipdiffusion --out results.json
    python benchmarks/bench_finetune.py --tiny --size 64 --steps 3            # CPU smoke test
    python benchmarks/bench_finetune.py --model ... --e2e --subjects 8        # the real jobs

For each method (--methods, default blipd,lora) and UNet mode (--compile: eager, then
torch.compile default and "reduce-overhead", i.e. CUDA graphs) it reports load_s (base model
to GPU), steps_s (--steps optimizer steps after --warmup), save_s and the artifact's bytes.
Targets: blipd 100 steps <= 15 s on an H100 after load; LoRA artifact <= 50 MB.

--e2e runs the real commands on a synthetic dataset of --subjects subjects: `finetune_subject`
(Ray Train, 1 worker; plus registration with --tracking-uri) for one subject per method, and
`finetune_many` over all subjects with --num-gpus per subject (e.g. 0.25: four per GPU), and
reports wall time and subjects/hour/GPU (target with lora: >= 200).

Numbers are still to be measured on a GPU machine (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import platform
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

from pipeline.config import load_config  # noqa: E402
from pipeline.train.losses import add_noise, diffusion_target, sample_latents, sample_timesteps  # noqa: E402
from pipeline.train.methods import REFERENCES_FOLDER, get_method  # noqa: E402
from stages.train_inputs import latent_params  # noqa: E402


def _photos(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_steps(args: argparse.Namespace, method_name: str, compile_mode: str | None, work: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _photos(work / REFERENCES_FOLDER, 4, args.size)
    overrides = [f"train.data={work}", f"train.resolution={args.size}", f"finetune.method={method_name}",
                 "finetune.subject_id=bench", "finetune.category=dog"]
    overrides += ["profile=tiny"] if args.tiny else [f"models.blip_diffusion={args.model}"]
    config = load_config(overrides=overrides)
    start = time.perf_counter()
    method = get_method(method_name).load(config).to(device)
    _sync(device)
    load_s = time.perf_counter() - start
    params = method.trainable_parameters()
    if compile_mode is not None:
        method.model.unet.to(memory_format=torch.channels_last).compile(mode=None if compile_mode == "default" else compile_mode)
    optimizer = torch.optim.AdamW(params, lr=config.finetune.learning_rate(), weight_decay=0.01, fused=device.type == "cuda")
    alphas = method.model.scheduler.alphas_cumprod.to(device)
    scaling = method.model.vae.config.scaling_factor
    bf16 = device.type == "cuda"
    targets = torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1
    prompts = method.build_prompts(["dog"] * args.batch, [""] * args.batch)
    method.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            latents = sample_latents(latent_params(method.model.vae, targets), scaling)
            noise = torch.randn_like(latents)
            t = sample_timesteps(args.batch, len(alphas), device)
            pred = method(None, ["dog"] * args.batch, prompts, add_noise(latents, noise, t, alphas), t, None)
            loss = method.loss(pred, diffusion_target(latents, noise, t, alphas, "epsilon"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    steps_s = time.perf_counter() - start
    start = time.perf_counter()
    method.save(work / "ckpt")
    save_s = time.perf_counter() - start
    size = sum(p.stat().st_size for p in (work / "ckpt").rglob("*") if p.is_file())
    return {"method": method_name, "unet": compile_mode or "eager", "batch": args.batch, "size": args.size, "steps": args.steps,
            "load_s": round(load_s, 2), "steps_s": round(steps_s, 2), "s_per_100_steps": round(steps_s / args.steps * 100, 2),
            "save_s": round(save_s, 2), "artifact_bytes": size,
            "gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def bench_e2e(args: argparse.Namespace, work: Path) -> list[dict]:
    from pipeline.train.finetune import finetune_subject
    from pipeline.train.many import finetune_many
    from tests.tinydata import publish_dataset

    subjects = {f"s{i:03d}": "dog" for i in range(args.subjects)}
    publish_dataset(work / "ds", subjects, per_subject=4, size=(args.size, args.size))
    gpu = torch.cuda.is_available()
    common = [f"finetune.subject={work / 'ds'}", f"finetune.steps={args.steps}", f"train.resolution={args.size}",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Salesforce/blipdiffusion")
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight model (CPU smoke test)")
    parser.add_argument("--methods", default="blipd,lora")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (default, reduce-overhead)")
    parser.add_argument("--e2e", action="store_true", help="also time the real finetune and finetune-many jobs")
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--num-gpus", type=float, default=0.25)
    parser.add_argument("--tracking-uri")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    results = []
    modes = [None, "default", "reduce-overhead"] if args.compile else [None]
    for method in args.methods.split(","):
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                row = bench_steps(args, method, mode, Path(tmp))
            print(json.dumps(row))
            results.append(row)
    if args.e2e:
        with tempfile.TemporaryDirectory() as tmp:
            for row in bench_e2e(args, Path(tmp)):
                print(json.dumps(row))
                results.append(row)
    meta = {"date": datetime.now(timezone.utc).isoformat(), "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "model": "tiny" if args.tiny else args.model}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
