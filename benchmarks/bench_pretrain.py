"""Samples/s of the pretraining step on one GPU, real sizes, 512x512, bf16 autocast.

The full step is the training loop's (pipeline/train/loop.py) on real-sized random weights: the
SD 1.5 UNet and VAE, the CLIP ViT-L text encoder, the BLIP-2 CLIP ViT-L/14 image encoder (23
layers) and BERT-base Q-Former; everything but the ViT and VAE trains (Pretrain method),
fused AdamW, grad clipping at 1.0, subject drop 0.15. The baseline is the bare SD 1.5 UNet step
(latents and text states given) in the same process. Each mode: warm-up steps, then timed steps
between CUDA synchronisations; samples/s = timed samples / seconds.

    python benchmarks/bench_pretrain.py --out results.json          # GPU, all step modes
    python benchmarks/bench_pretrain.py --tiny --size 64 --batch 2  # CPU smoke test
    python benchmarks/bench_pretrain.py --e2e --workers 2 ...       # the real job (Ray Data + Ray Train)

Step modes (--modes, in order, until --budget seconds are spent):
  unet-eager            bare UNet, eager                  unet-compiled   + torch.compile, channels_last
  full-raw-eager        whole step from pixels (VAE encode and ViT inside the step)
  full-pre-eager        from precomputed VAE posteriors and ViT features
  full-pre-compiled     + UNet compiled, channels_last (train.compile)
  full-raw-compiled     from pixels, UNet compiled
Each mode can be suffixed @B for batch B (default --batch), and full-* modes take flags after
`+` (issue 5's ablation, each the loop's setting or the state before it):
  +legacy   the old conditioning: only kept rows through the Q-Former and text encoder, so
            their batch size changes every step (before: every row, fixed shapes)
  +cudnn    train.sdpa_backend=default (before: no-cudnn) for the Q-Former and text encoder
  +all      compiled modes: the Q-Former and text encoder compiled too (train.compile)
  +graphs   eager modes: the UNet's forward and backward as CUDA graphs (train.cuda_graphs)
`data` times the Ray Data decode stage (samples/s per CPU core) and the precompute encoder
(samples/s on the GPU); `profile` runs torch.profiler over 3 full steps in the state the last
mode left (tables in <out>.profile.txt). --ablation runs issue 5's list (ABLATION).
--wait-file: timed steps wait until that file exists (another benchmark sharing the GPU is
done), after the first warm-up step, which holds the compilation.

--e2e runs `run_training` itself (Ray Data decoding a synthetic 512 px dataset, Ray Train with
`--workers` GPUs) with and without precompute and reports the job's own samples/s and its
data-wait share: the 1 -> N GPU scaling run (2-GPU machine) is `--e2e --workers 1` then
`--workers 2`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import load_config  # noqa: E402
from pipeline.model import BlipDiffusion, SubjectImageProcessor  # noqa: E402
from pipeline.model.blip_diffusion import _to_device  # noqa: E402
from pipeline.model.make_tiny import sd_scheduler  # noqa: E402
from pipeline.model.qformer import SubjectQFormer  # noqa: E402
from pipeline.model.text_encoder import ContextCLIPTextModel  # noqa: E402
from pipeline.model.tokenizers import load_clip_tokenizer, load_qformer_tokenizer  # noqa: E402
from pipeline.train.losses import add_noise, diffusion_target, sample_latents, sample_timesteps, subject_drop_mask  # noqa: E402
from pipeline.train.methods import Pretrain  # noqa: E402
from pipeline.train.speed import COMPILED_PARTS, GraphedUNet, compile_model  # noqa: E402
from stages.train_inputs import FrozenEncoder, image_features, latent_params, prepare_batch  # noqa: E402

TINY = REPO / "pipeline" / "assets" / "tiny-blipdiffusion"
log = logging.getLogger("bench_pretrain")

# Issue 5's ablation, cumulative: the last session's full-pre-compiled step, then each change.
ABLATION = ("full-pre-compiled+legacy+cudnn,full-pre-compiled+legacy,full-pre-compiled,full-pre-compiled+all,"
            "profile,full-pre-eager+graphs")


def legacy_encode_conditioning(model: BlipDiffusion, pixel_values, categories, prompts, drop_subject=None) -> torch.Tensor:
    """The conditioning before issue 5's change (commit 3e1bc5b): kept rows through the Q-Former
    and the text encoder with their subject, dropped rows through the text encoder alone, so
    both batch sizes change from step to step. For the ablation's baseline rows only."""
    drop = drop_subject.bool().cpu()
    keep_idx = (~drop).nonzero().flatten().tolist()
    drop_idx = drop.nonzero().flatten().tolist()
    parts = []
    if keep_idx:
        kept = pixel_values if not drop_idx else pixel_values[_to_device(torch.tensor(keep_idx), pixel_values.device)]
        subject = model.subject_embeddings(kept, [categories[i] for i in keep_idx])
        parts.append(model.encode_prompts([prompts[i] for i in keep_idx], subject))
    if drop_idx:
        parts.append(model.encode_prompts([prompts[i] for i in drop_idx], None))
    hidden = torch.cat(parts)
    if not drop_idx:
        return hidden
    return hidden[_to_device(torch.tensor(keep_idx + drop_idx).argsort(), hidden.device)]


def build_real(device: torch.device) -> BlipDiffusion:
    """Real-sized BLIP-Diffusion with random weights, float32 (the training master weights)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_generate import real_configs  # the released sizes, shared with the generation bench

    qformer_raw, text_raw = real_configs()
    with torch.device(device):
        qformer = SubjectQFormer(qformer_raw)
        text_encoder = ContextCLIPTextModel(text_raw)
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # SD 1.5 otherwise
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        )
    return BlipDiffusion(
        qformer=qformer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=sd_scheduler(),
        tokenizer=load_clip_tokenizer(TINY / "tokenizer", 49408),
        qformer_tokenizer=load_qformer_tokenizer(TINY, None, 30523), image_processor=SubjectImageProcessor(),
    ).to(device)


def random_batch(model: BlipDiffusion, batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(batch, 3, model.qformer.image_size, model.qformer.image_size, generator=g).to(device)
    target = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        features = image_features(model.qformer, pixels).to(torch.float16)
        posterior = latent_params(model.vae, target).float()
    categories = ["dog", "backpack", "teddy bear", "sneaker"] * (batch // 4 + 1)
    return {"pixel_values": pixels, "target": target, "image_features": features, "latent_params": posterior,
            "categories": categories[:batch], "prompts": [f"a {c}" for c in categories[:batch]]}


def full_step(method: Pretrain, batch: dict, precomputed: bool, device: torch.device):
    """One optimizer step, exactly the loop's body (one micro-batch, no hooks)."""
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    schedule = DDPMScheduler.from_config(method.model.scheduler.config)
    alphas = schedule.alphas_cumprod.to(device)
    scaling = method.model.vae.config.scaling_factor
    bf16 = device.type == "cuda"
    channels_last = method.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and device.type == "cuda"
    graphs = method.graphed_unet is not None

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphs):
            if precomputed:
                posterior, subject = batch["latent_params"], batch["image_features"]
            else:
                posterior, subject = latent_params(method.model.vae, batch["target"]), batch["pixel_values"]
            latents = sample_latents(posterior, scaling)
            if channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            noise = torch.randn_like(latents)
            t = sample_timesteps(latents.shape[0], 1000, device)
            noisy = add_noise(latents, noise, t, alphas)
            target = diffusion_target(latents, noise, t, alphas, "epsilon")
            drop = subject_drop_mask(latents.shape[0], 0.15, torch.device("cpu"))  # as the loop
            loss = method.loss(method(subject, batch["categories"], batch["prompts"], noisy, t, drop), target)
        return apply_update(loss, params, optimizer)

    return step


def apply_update(loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The update every benchmarked step ends with, as the loop's: backward, clip at 1.0, step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def unet_step(unet: torch.nn.Module, batch: int, size: int, device: torch.device):
    """The baseline: the bare SD 1.5 UNet training step on given latents and text states."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    alphas = DDPMScheduler.from_config(sd_scheduler().config).alphas_cumprod.to(device)
    latents = torch.randn(batch, 4, size // 8, size // 8, device=device)
    if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and device.type == "cuda":
        latents = latents.contiguous(memory_format=torch.channels_last)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            noise = torch.randn_like(latents)
            t = sample_timesteps(batch, 1000, device)
            pred = unet(add_noise(latents, noise, t, alphas), t, encoder_hidden_states=states).sample
            loss = F.mse_loss(pred.float(), noise)
        return apply_update(loss, params, optimizer)

    return step


def wait_for(path: Path | None, max_s: float = 420.0) -> None:
    """Wait until `path` exists (at most max_s): the benchmark sharing the GPU is done."""
    start = time.perf_counter()
    while path is not None and not path.exists() and time.perf_counter() - start < max_s:
        time.sleep(1.0)
    if path is not None and time.perf_counter() - start > 1.0:
        log.info("waited %.0f s for %s", time.perf_counter() - start, path)


def time_steps(step, device: torch.device, warmup: int, steps: int, wait: Path | None = None) -> tuple[float, float]:
    """(seconds for `steps` steps after `warmup`, seconds of the warm-up). `wait`: see wait_for,
    checked after the first warm-up step (the compilation)."""
    start = time.perf_counter()
    for i in range(warmup):
        loss = step()
        if i == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            wait_for(wait)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {loss.item()}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, warm


def profile_step(step, device: torch.device, out: Path) -> dict:
    """torch.profiler over 3 steps (after 2): the top ops by device and host time, written next
    to `out`, and how often the host waited for the device."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=25) + "\n" + events.table(sort_by="self_cpu_time_total", row_limit=25)
    out.with_suffix(".profile.txt").write_text(table)
    syncs = {e.key: e.count for e in events if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense")}
    log.info("profile (3 steps): %s", syncs)
    print(events.table(sort_by=sort, row_limit=12))
    return {"calls_in_3_steps": syncs}


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random picture (compresses like a photo, unlike noise)."""
    small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def bench_data(model: BlipDiffusion, size: int, device: torch.device, rows: int = 64) -> dict:
    """Decode stage on one CPU core, and the precompute encoder on the device."""
    rng = np.random.default_rng(0)
    width = size * 4 // 3
    batch = {
        "category": np.array(["dog"] * rows, dtype=object),
        "image": np.array([jpeg(synthetic_photo(rng, width, size)) for _ in range(rows)], dtype=object),
        "composite": np.array([jpeg(synthetic_photo(rng, width, size)) for _ in range(rows)], dtype=object),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray Data task gets one CPU
    start = time.perf_counter()
    out = prepare_batch(batch, processor=model.image_processor, resolution=size, crop="random")
    decode = rows / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    encoder = FrozenEncoder.__new__(FrozenEncoder)  # reuse the in-memory model instead of loading one
    encoder.device, encoder.vae, encoder.qformer = device, model.vae, model.qformer
    encoder.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    chunk = {k: v[:32] for k, v in out.items()}
    encoder(chunk)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        encoder(chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    precompute = 3 * len(chunk["category"]) / (time.perf_counter() - start)
    return {"decode_samples_per_s_per_core": round(decode, 1), "precompute_samples_per_s": round(precompute, 1)}


def run_modes(args, device: torch.device, results: dict, t0: float) -> None:
    if args.tiny:
        model = BlipDiffusion.from_pretrained(TINY, device=device)
    else:
        model = build_real(device)
    config = load_config(overrides=["profile=tiny"])
    method = Pretrain(model, config)
    method.trainable_parameters()
    method.train()
    results["params_m"] = {
        "trainable": round(sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6, 1),
        "total": round(sum(p.numel() for p in method.parameters()) / 1e6, 1),
    }
    compiled: tuple[str, ...] = ()
    for spec in args.modes.split(","):
        mode, _, batch_text = spec.partition("@")
        name, *flags = mode.split("+")
        batch_size = int(batch_text or args.batch)
        if time.perf_counter() - t0 > args.budget:
            log.info("skip %s: budget spent", spec)
            continue
        if name == "data":
            results["data"] = bench_data(model, args.size, device)
            log.info("data: %s", results["data"])
            continue
        if name == "profile":
            wait_for(args.wait_file)
            batch = random_batch(model, batch_size, args.size, device)
            results["profile"] = profile_step(full_step(method, batch, True, device), device, args.out)
            continue
        # The modules compiled for this mode; compiling more (or returning to eager) keeps the rest.
        want = (("unet",) + (COMPILED_PARTS[1:] if "all" in flags else ())) if name.endswith("compiled") else ()
        if device.type == "cuda" and want != compiled:
            set_compiled(model, compiled, want)
            compiled = want
        method.config = load_config(overrides=["profile=tiny", f"train.sdpa_backend={'default' if 'cudnn' in flags else 'no-cudnn'}"])
        method.graphed_unet = GraphedUNet(model.unet) if "graphs" in flags and device.type == "cuda" else None
        if "legacy" in flags:
            model.encode_conditioning = partial(legacy_encode_conditioning, model)
        else:
            model.__dict__.pop("encode_conditioning", None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            if name.startswith("unet"):
                step = unet_step(model.unet, batch_size, args.size, device)
            else:
                batch = random_batch(model, batch_size, args.size, device)
                step = full_step(method, batch, precomputed="-pre-" in name, device=device)
            seconds, warm = time_steps(step, device, args.warmup, args.steps, args.wait_file)
        except Exception as exc:  # out of memory, or a failed capture: record it, keep the other rows
            log.exception("%s failed", spec)
            results["runs"].append({"mode": mode, "batch": batch_size, "error": f"{type(exc).__name__}: {exc}"[:500]})
            args.out.write_text(json.dumps(results, indent=2))
            continue
        row = {
            "mode": mode,
            "batch": batch_size,
            "samples_per_s": round(args.steps * batch_size / seconds, 1),
            "step_ms": round(1000 * seconds / args.steps, 1),
            "warmup_s": round(warm, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
        }
        results["runs"].append(row)
        log.info("%-40s batch %3d  %7.1f samples/s  %7.1f ms/step  (warm-up %.0f s, peak %s GiB)", mode,
                 batch_size, row["samples_per_s"], row["step_ms"], warm, row["peak_mem_gib"])
        args.out.write_text(json.dumps(results, indent=2))


def set_compiled(model: BlipDiffusion, compiled: tuple[str, ...], want: tuple[str, ...]) -> None:
    """Compile the parts in `want` not compiled yet; return the others to eager (the bench's
    way back from nn.Module.compile, which has no public undo)."""
    torch._inductor.config.conv_1x1_as_mm = True
    for part in compiled:
        if part not in want:
            getattr(model, part)._compiled_call_impl = None
            if part == "unet":
                model.unet.to(memory_format=torch.contiguous_format)
    new = tuple(p for p in want if p not in compiled)
    if new:
        compile_model(model, new)


def write_dataset(root: Path, rows: int, size: int) -> Path:
    """A published dataset version of `rows` synthetic 512 px JPEG rows (4 subjects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.versions import MANIFEST, DatasetStore, write_json_atomic
    from stages.write import DATA_SCHEMA

    rng = np.random.default_rng(0)
    store = DatasetStore(root)
    staging = store.new_staging("v0001")
    (staging / "data").mkdir()
    subjects = ["dog", "backpack", "teddy", "sneaker"]
    width = size * 4 // 3
    table = []
    for i in range(rows):
        sid = subjects[i % 4]
        table.append({
            "subject_id": sid, "category": sid, "source_uri": f"{sid}/{i}.jpg", "source_sha256": f"{i:064d}",
            "image": jpeg(synthetic_photo(rng, width, size)), "composite": jpeg(synthetic_photo(rng, width, size)),
            "alpha": b"", "trimap": b"", "background_id": "bg", "seed": i, "composite_index": 0, "placement": "{}",
            "width": width, "height": size, "alpha_area": 0.5, "dataset_version": "v0001",
        })
    for part in range(8):  # 8 shards, so Ray Data reads and decodes in parallel
        pq.write_table(pa.Table.from_pylist(table[part::8], schema=DATA_SCHEMA), staging / "data" / f"part-{part:05d}.parquet", row_group_size=32)
    counts = {s: {"category": s, "rows": rows // 4} for s in subjects}
    write_json_atomic(staging / MANIFEST, {"version": "v0001", "rows": rows, "subjects": counts})
    return store.publish(staging, "v0001")


def run_e2e(args, results: dict) -> None:
    """`run_training` on a synthetic dataset with and without precompute."""
    from pipeline.train.trainer import run_training

    work = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    write_dataset(work / "dataset", args.rows, args.size)
    if args.tiny:
        model_path = str(TINY)
    else:
        start = time.perf_counter()
        build_real(torch.device("cpu")).save_pretrained(work / "model")
        model_path = str(work / "model")
        log.info("saved the real-size model in %.0f s", time.perf_counter() - start)
    gpu = torch.cuda.is_available()
    for precompute in args.e2e_precompute.split(","):
        overrides = [
            "profile=tiny", f"models.blip_diffusion={model_path}", f"train.data={work / 'dataset'}",
            f"train.storage_path={work / 'runs'}", f"train.run_name=e2e-{precompute}-{args.workers}",
            f"train.workers={args.workers}", f"train.gpu={str(gpu).lower()}", f"train.batch_size={args.batch}",
            f"train.resolution={args.size}", f"train.steps={args.steps}", f"train.log_every={args.steps // 2}",
            f"train.checkpoint_every={args.steps}", "train.samples.every=0", "tracking.enabled=false",
            f"train.precompute={precompute}", f"train.compile={str(args.compile).lower()}", "train.warmup_steps=0",
            f"train.cpus_per_worker={args.cpus_per_worker}", "train.lr=1e-5",
        ]
        start = time.perf_counter()
        result = run_training(load_config(overrides=overrides))
        row = {"precompute": precompute == "true", "workers": args.workers, "batch_per_worker": args.batch,
               "wall_s": round(time.perf_counter() - start, 1), **{k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)}}
        results["e2e"].append(row)
        log.info("e2e %s", row)
        args.out.write_text(json.dumps(results, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint instead of real sizes")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="samples per step (per worker in --e2e)")
    parser.add_argument("--modes", default="unet-eager,full-raw-eager,full-pre-eager,data,unet-compiled,full-pre-compiled")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (total steps in --e2e)")
    parser.add_argument("--budget", type=float, default=420.0, help="start no new mode after this many s")
    parser.add_argument("--e2e", action="store_true", help="run the training job itself instead of step modes")
    parser.add_argument("--e2e-precompute", default="false,true", help="precompute settings to run, in order")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=512, help="synthetic dataset rows (--e2e)")
    parser.add_argument("--compile", action="store_true", help="train.compile in --e2e")
    parser.add_argument("--ablation", action="store_true", help="--modes ABLATION (issue 5's cumulative changes)")
    parser.add_argument("--wait-file", type=Path, help="timed steps wait for this file (see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path("bench_pretrain.json"))
    args = parser.parse_args()
    if args.ablation:
        args.modes = ABLATION
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    import diffusers
    import transformers

    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {k: str(v) for k, v in vars(args).items()},
        "runs": [],
        "e2e": [],
    }
    if args.e2e:
        run_e2e(args, results)
    else:
        run_modes(args, device, results, t0)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
