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

Step modes (--modes, in order, while --budget allows):
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
  +mode=M   compiled modes: torch.compile mode M of every compiled part (train.compile_mode;
            default, reduce-overhead, max-autotune-no-cudagraphs, max-autotune)
  +uattn=A  the UNet's attention kernel A in training (train.unet_sdpa_backend; auto, flash,
            efficient, cudnn, no-cudnn, math)
  +noclconv compiled modes: the UNet's convolutions take the layouts diffusers hands them
            (before: compile_model's channels_last_convolutions, channels-last inputs and output
            gradients, so that cuDNN's convolution backward copies none; issue 18)
`attention` times the UNet's own attention calls (their shapes recorded from one forward at
--size) forward and backward at --batch under each SDPA kernel of --attn-backends, without
compiling anything: what each kernel costs per UNet step. `data` times the Ray Data decode
stage (samples/s per CPU core) and the precompute encoder (samples/s on the GPU); `profile`
runs torch.profiler over 3 full steps in the state the last mode left (tables in
<out>.profile.txt). --preset NAME runs a named list (PRESETS): `run3` is the host-side ablation (--ablation, rows
A-D of BENCHMARKS.md's "Pretraining step"), `run4` the next candidates on top of its row D, most
informative first. A row that compiles the UNet again under CUDA graphs in the same process (a
reduce-overhead row, then the same with +noclconv) ended in a segmentation fault on torch 2.11:
compare such rows in separate runs, one mode each, as BENCHMARKS.md's step table does:

    TORCHINDUCTOR_COMPILE_THREADS=10 python benchmarks/bench_pretrain.py \
        --modes full-pre-compiled+all+mode=reduce-overhead+noclconv --warmup 4 --steps 12 --out $OUT/before.json
--budget is the whole run's seconds: a row starts only when its estimated cost (ROW_COST_S:
compiles it triggers plus steps) still fits; results go to --out after every row.
--wait-file: timed steps wait until that file exists (another benchmark sharing the GPU is
done), after the first warm-up step, which holds the compilation.

On the CPU (--tiny) compiled modes use --compile-backend aot_eager (Dynamo and AOTAutograd,
the same graphs and kernel choices, no Inductor code generation: Inductor takes minutes per
tiny UNet on 2 cores) and CUDA-graph modes run without CUDA graphs, so a CPU run checks that
every row runs, not how fast.

--e2e runs `run_training` itself (Ray Data decoding a synthetic 512 px dataset, Ray Train with
`--workers` GPUs), one `--job NAME:STEPS:LOG_EVERY[:overrides]` after another in one storage
path, and reports each job's own figures over its last logging interval (samples/s, data-wait
share, peak GPU memory) and its time from the job's start to the first step (a later job with
the same shapes finds the compile cache of an earlier one):

    python benchmarks/bench_pretrain.py --e2e --rows 1024 --cpus-per-worker 8 \
        --job cold:600:300 --job warm:20:10 --job raw:300:150:train.precompute=false

--composite (with --e2e, no --job) runs composite_jobs: stored composites with precompute, stored
from pixels, online composites (train.composite online) from pixels, and online with the
targets precomputed, --steps each; the difference of their samples/s is what fresh composites
every epoch cost a step. --smoke is a CPU check that
every path of a command runs (tiny model, 64 px, batch 2, 16 rows), not how fast:

    python benchmarks/bench_pretrain.py --e2e --composite --pool 2000 --rows 1024 --cpus-per-worker 8 --steps 300
    python benchmarks/bench_pretrain.py --feed --feeds pre-binary,raw-new,online --pool 2000 --rows 1024 --steps 200
    python benchmarks/bench_pretrain.py --smoke --e2e --composite --steps 4

The 1 -> N GPU scaling run is the same jobs with `--workers 1` then `--workers N`.
BENCH_CODE_ROOT=<folder> imports `pipeline` from another checkout (a baseline commit; give its
workers the same folder on PYTHONPATH).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import io
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT", str(REPO)))

from pipeline.config import load_config  # noqa: E402
from pipeline.model import BlipDiffusion, SubjectImageProcessor  # noqa: E402
from pipeline.model.blip_diffusion import to_device_async  # noqa: E402
from pipeline.model.make_tiny import sd_scheduler  # noqa: E402
from pipeline.model.qformer import SubjectQFormer  # noqa: E402
from pipeline.model.text_encoder import ContextCLIPTextModel  # noqa: E402
from pipeline.model.tokenizers import load_clip_tokenizer, load_qformer_tokenizer  # noqa: E402
from pipeline.train.losses import add_noise, diffusion_target, sample_latents, sample_timesteps, subject_drop_mask  # noqa: E402
from pipeline.train.methods import Pretrain  # noqa: E402
from pipeline.train.speed import (  # noqa: E402
    COMPILE_MODES,
    COMPILED_PARTS,
    CUDA_GRAPH_MODES,
    UNET_SDPA_BACKENDS,
    GraphedUNet,
    channels_last_convolutions,
    compile_model,
    remove_channels_last_convolutions,
    set_unet_attention,
    step_begin,
)
from stages.train_inputs import FrozenEncoder, image_features, latent_params, prepare_batch  # noqa: E402

TINY = REPO / "pipeline" / "assets" / "tiny-blipdiffusion"
log = logging.getLogger("bench_pretrain")

# Issue 5's ablation, cumulative: the last session's full-pre-compiled step, then each change.
ABLATION = (
    "full-pre-compiled+legacy+cudnn,full-pre-compiled+legacy,full-pre-compiled,full-pre-compiled+all,"
    "profile,full-pre-eager+graphs"
)
# After the ablation: candidates on top of its row D (full-pre-compiled+all, 89.9 samples/s),
# most informative first, each row one change, with what it compiles:
#   attention        the UNet's attention kernels alone: flash vs cuDNN per step (nothing)
#   D + CUDA graphs  compile_mode reduce-overhead (UNet and encoders, cold cache: the costly row)
#   + UNet flash     the same with the UNet's attention on flash (the UNet again)
#   profile          where the time goes in that state (3 steps; nothing)
#   @48              that state at batch 48 (UNet and encoders again, for the new shapes)
#   D + UNet flash   without CUDA graphs (all again): flash alone, in this process; also what
#                    runs when reduce-overhead failed (its other rows are then skipped)
RUN4 = (
    "attention,full-pre-compiled+all+mode=reduce-overhead,full-pre-compiled+all+mode=reduce-overhead+uattn=flash,"
    "profile,full-pre-compiled+all+mode=reduce-overhead+uattn=flash@48,full-pre-compiled+all+uattn=flash"
)
PRESETS = {"run3": ABLATION, "run4": RUN4}

# Estimated seconds a row costs on an H100 (its compiles, then warm-up and timed steps), for the
# --budget check. The ablation (10 compile threads, cold Inductor cache): UNet compile ~190 s, Q-Former
# and text encoder ~85 s; a recompile finds most Triton kernels in the cache. Deliberately not
# pessimistic: a row cut off by the caller's time limit costs only itself (results are written
# after every row).
ROW_COST_S = {
    "unet_first": 180.0,
    "unet_again": 100.0,
    "encoders_first": 80.0,
    "encoders_again": 45.0,
    "step": 0.6,
    "fixed": 10.0,
    "attention": 15.0,
    "profile": 30.0,
    "data": 30.0,
}


def legacy_encode_conditioning(
    model: BlipDiffusion, pixel_values, categories, prompts, drop_subject=None
) -> torch.Tensor:
    """The conditioning before issue 5's change (commit 3e1bc5b): kept rows through the Q-Former
    and the text encoder with their subject, dropped rows through the text encoder alone, so
    both batch sizes change from step to step. For the ablation's baseline rows only."""
    drop = drop_subject.bool().cpu()
    keep_idx = (~drop).nonzero().flatten().tolist()
    drop_idx = drop.nonzero().flatten().tolist()
    parts = []
    if keep_idx:
        kept = pixel_values if not drop_idx else pixel_values[to_device_async(torch.tensor(keep_idx), pixel_values.device)]
        subject = model.subject_embeddings(kept, [categories[i] for i in keep_idx])
        parts.append(model.encode_prompts([prompts[i] for i in keep_idx], subject))
    if drop_idx:
        parts.append(model.encode_prompts([prompts[i] for i in drop_idx], None))
    hidden = torch.cat(parts)
    if not drop_idx:
        return hidden
    return hidden[to_device_async(torch.tensor(keep_idx + drop_idx).argsort(), hidden.device)]


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
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
    return BlipDiffusion(
        qformer=qformer,
        text_encoder=text_encoder,
        unet=unet,
        vae=vae,
        scheduler=sd_scheduler(),
        tokenizer=load_clip_tokenizer(TINY / "tokenizer", 49408),
        qformer_tokenizer=load_qformer_tokenizer(TINY, None, 30523),
        image_processor=SubjectImageProcessor(),
    ).to(device)


def random_batch(model: BlipDiffusion, batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    pixels = torch.randn(batch, 3, model.qformer.image_size, model.qformer.image_size, generator=g).to(device)
    target = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        features = image_features(model.qformer, pixels).to(torch.float16)
        posterior = latent_params(model.vae, target).float()
    categories = ["dog", "backpack", "teddy bear", "sneaker"] * (batch // 4 + 1)
    return {
        "pixel_values": pixels,
        "target": target,
        "image_features": features,
        "latent_params": posterior,
        "categories": categories[:batch],
        "prompts": [f"a {c}" for c in categories[:batch]],
    }


def full_step(method: Pretrain, batch: dict, precomputed: bool, device: torch.device, compile_mode: str | None = None):
    """One optimizer step, exactly the loop's body (one micro-batch, no hooks). compile_mode: the
    compiled parts' torch.compile mode (None: eager), for the loop's step-start mark."""
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    schedule = DDPMScheduler.from_config(method.model.scheduler.config)
    alphas = schedule.alphas_cumprod.to(device)
    scaling = method.model.vae.config.scaling_factor
    bf16 = device.type == "cuda"
    channels_last = (
        method.model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and device.type == "cuda"
    )
    graphs = method.graphed_unet is not None

    def step() -> torch.Tensor:
        step_begin(compile_mode)
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


def apply_update(
    loss: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> torch.Tensor:
    """The update every benchmarked step ends with, as the loop's: backward, clip at 1.0, step."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def unet_step(unet: torch.nn.Module, batch: int, size: int, device: torch.device, compile_mode: str | None = None):
    """The baseline: the bare SD 1.5 UNet training step on given latents and text states."""
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    alphas = DDPMScheduler.from_config(sd_scheduler().config).alphas_cumprod.to(device)
    latents = torch.randn(batch, 4, size // 8, size // 8, device=device)
    if unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and device.type == "cuda":
        latents = latents.contiguous(memory_format=torch.channels_last)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)

    def step() -> torch.Tensor:
        step_begin(compile_mode)
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
    # Shapes recorded so that work on parameter-sized tensors outside the compiled graphs (the
    # gradient clip, the optimizer, gradient copies) stands apart from the step's own small ops.
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=40, max_shapes_column_width=120)
    table = "\n".join([
        events.table(sort_by=sort, row_limit=40), events.table(sort_by="self_cpu_time_total", row_limit=25),
        "by input shape:", by_shape,
    ])
    out.with_suffix(".profile.txt").write_text(table)
    syncs = {
        e.key: e.count
        for e in events
        if "Synchronize" in e.key or e.key in ("cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense")
    }
    log.info("profile (3 steps): %s", syncs)
    print(events.table(sort_by=sort, row_limit=40))
    print(by_shape)
    return {"calls_in_3_steps": syncs}


class _RecordAttention(TorchFunctionMode):
    """Records (heads, query length, key length, head dim) of every SDPA call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int, int, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.calls.append((q.shape[1], q.shape[2], k.shape[2], q.shape[3]))
        return func(*args, **(kwargs or {}))


def unet_attention_calls(unet: torch.nn.Module, size: int, text_len: int, device: torch.device) -> collections.Counter:
    """The UNet's SDPA calls in one forward at `size` px (batch 1), counted by shape. Runs the
    module's own forward, past any compiled wrapper, so nothing is traced here."""
    record = _RecordAttention()
    latents = torch.randn(1, unet.config.in_channels, size // 8, size // 8, device=device)
    states = torch.randn(1, text_len, unet.config.cross_attention_dim, device=device)
    timesteps = torch.tensor([500], device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), record:
        type(unet).forward(unet, latents, timesteps, encoder_hidden_states=states)
    return collections.Counter(record.calls)


def time_attention(
    shape: tuple[int, int, int, int],
    batch: int,
    setting: str,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 3,
    iters: int = 10,
) -> dict:
    """ms per call of one attention shape under `setting` (UNET_SDPA_BACKENDS): forward alone, and
    forward plus backward (autograd.grad, as the training step). q, k, v and the output gradient
    are laid out as diffusers' processor makes them: (B, L, H, D) memory viewed as (B, H, L, D)."""
    heads, q_len, kv_len, dim = shape
    backends = UNET_SDPA_BACKENDS[setting]
    gen = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(batch, n, heads, dim, generator=gen).to(device, dtype).requires_grad_()
        for n in (q_len, kv_len, kv_len)
    )
    grad = torch.randn(batch, q_len, heads, dim, generator=gen).to(device, dtype).transpose(1, 2)

    def forward() -> torch.Tensor:
        with sdpa_kernel(backends) if backends is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def forward_backward() -> None:
        torch.autograd.grad(forward(), (q, k, v), grad)

    def ms(fn) -> float:
        for _ in range(warmup):
            fn()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        begin = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1000 * (time.perf_counter() - begin) / iters

    with torch.no_grad():
        fwd = ms(forward)
    return {"fwd": round(fwd, 3), "fwd_bwd": round(ms(forward_backward), 3)}


def bench_attention(
    unet: torch.nn.Module, size: int, batch: int, text_len: int, settings: list[str], device: torch.device
) -> dict:
    """The UNet's attention calls at `size` px and `batch` under each kernel setting: ms per call
    and per UNet step (the sum over its calls), forward and forward plus backward."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    calls = unet_attention_calls(unet, size, text_len, device)
    rows, per_step = [], {}
    for shape, count in sorted(calls.items(), key=lambda item: -item[0][1]):
        heads, q_len, kv_len, dim = shape
        probe = [
            torch.zeros(batch, n, heads, dim, device=device, dtype=dtype, requires_grad=True).transpose(1, 2)
            for n in (q_len, kv_len, kv_len)
        ]
        try:
            picks = SDPBackend(torch._fused_sdp_choice(*probe)).name  # PyTorch's choice for "auto"
        except Exception:  # private API: informative only
            picks = "?"
        row = {
            "heads": heads,
            "q_len": q_len,
            "kv_len": kv_len,
            "head_dim": dim,
            "calls_per_step": count,
            "auto_picks": picks,
            "ms": {},
        }
        for setting in settings:
            try:
                row["ms"][setting] = time_attention(shape, batch, setting, device, dtype)
            except RuntimeError as exc:  # no kernel of that kind for these inputs or this device
                row["ms"][setting] = {"error": str(exc).splitlines()[0][:200]}
        rows.append(row)
        log.info(
            "attention %s x%d (auto: %s): %s",
            shape,
            count,
            picks,
            "  ".join(f"{k} {v.get('fwd_bwd', 'n/a')}" for k, v in row["ms"].items()),
        )
    for setting in settings:
        # A kernel that cannot take some shapes gets the sum over the others, and says how many
        # calls per step it missed (a strict setting would fail on those in training).
        timed = [r for r in rows if "fwd_bwd" in r["ms"][setting]]
        per_step[setting] = {
            part: round(sum(r["calls_per_step"] * r["ms"][setting][part] for r in timed), 2)
            for part in ("fwd", "fwd_bwd")
        }
        per_step[setting]["calls_without_kernel"] = sum(r["calls_per_step"] for r in rows if r not in timed)
    log.info("attention per UNet step (ms, fwd / fwd+bwd): %s", per_step)
    return {"batch": batch, "size": size, "dtype": str(dtype), "calls": rows, "per_unet_step_ms": per_step}


def jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth random picture (compresses like a photo, unlike noise)."""
    small = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))


def synthetic_pool(folder: Path, count: int, size: int) -> str:
    """A folder of `count` synthetic size x size JPEG backgrounds (made once), standing in for a
    pool of photos where none can be downloaded: what matters to the online feed's speed is how
    many there are (its caches hold 64), not what they show."""
    if not folder.is_dir() or len(list(folder.glob("*.jpg"))) != count:
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(1)
        for i in range(count):
            (folder / f"bg{i:05d}.jpg").write_bytes(jpeg(synthetic_photo(rng, size, size)))
    return str(folder)


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


STEP_MODES = (
    "unet-eager",
    "unet-compiled",
    "full-raw-eager",
    "full-pre-eager",
    "full-pre-compiled",
    "full-raw-compiled",
)
PLAIN_FLAGS = ("legacy", "cudnn", "all", "graphs", "noclconv")


@dataclass
class Row:
    """One entry of --modes: `name` (a step mode, attention, data or profile), its flags, batch."""

    spec: str
    mode: str  # the spec without @batch
    name: str
    flags: set[str]
    compile_mode: str  # +mode=, for compiled modes
    uattn: str  # +uattn=
    batch: int

    @property
    def compiled(self) -> dict[str, str]:
        """The parts this row compiles -> their torch.compile mode."""
        if not self.name.endswith("compiled"):
            return {}
        parts = ("unet",) + (COMPILED_PARTS[1:] if "all" in self.flags else ())
        return dict.fromkeys(parts, self.compile_mode)

    @property
    def clconv(self) -> bool:
        """channels_last_convolutions on: compile_model's state, unless +noclconv."""
        return "unet" in self.compiled and "noclconv" not in self.flags


def parse_rows(modes: str, default_batch: int) -> list[Row]:
    """--modes as rows; an unknown mode, flag or setting is an error before any work."""
    rows = []
    for spec in modes.split(","):
        mode, _, batch_text = spec.partition("@")
        name, *flags = mode.split("+")
        options = dict(f.split("=", 1) for f in flags if "=" in f)
        plain = {f for f in flags if "=" not in f}
        if name not in STEP_MODES + ("attention", "data", "profile"):
            raise SystemExit(f"unknown mode {name!r} in {spec!r}")
        if plain - set(PLAIN_FLAGS) or set(options) - {"mode", "uattn"}:
            raise SystemExit(f"unknown flag in {spec!r} (flags: {', '.join(PLAIN_FLAGS)}, mode=, uattn=)")
        row = Row(
            spec,
            mode,
            name,
            plain,
            options.get("mode", "default"),
            options.get("uattn", "auto"),
            int(batch_text or default_batch),
        )
        if row.compile_mode not in COMPILE_MODES or row.uattn not in UNET_SDPA_BACKENDS:
            raise SystemExit(
                f"unknown setting in {spec!r}: mode one of {COMPILE_MODES}, uattn one of {tuple(UNET_SDPA_BACKENDS)}"
            )
        if "noclconv" in row.flags and not row.compiled:
            raise SystemExit(f"+noclconv needs a compiled mode (eager rows never hook the convolutions): {spec!r}")
        rows.append(row)
    return rows


class _TorchWarnings(logging.Handler):
    """PyTorch's warnings while a row runs (cudagraph skips, recompile limits), for its record."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.lines) < 20:
            self.lines.append(record.getMessage().splitlines()[0][:300])


def run_modes(args, device: torch.device, results: dict, t0: float) -> None:
    rows = parse_rows(args.modes, args.batch)
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")
    # A different batch recompiles with static shapes, as a run at that batch would compile; and
    # the rows' recompiles (modes, kernels, batches) must not reach Dynamo's limit, past which it
    # would silently run the module eagerly.
    torch._dynamo.config.automatic_dynamic_shapes = False
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    if len({row.clconv for row in rows if row.compiled}) > 1:
        # Dynamo does not guard on module hooks by default: a UNet compiled with
        # channels_last_convolutions' hooks would replay its graphs in a +noclconv row after
        # they were removed (and the other way round). Guarded, it traces again.
        torch._dynamo.config.skip_nnmodule_hook_guards = False
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
    results["compile_backend"] = backend
    warnings = _TorchWarnings()
    logging.getLogger("torch").addHandler(warnings)
    compiled: dict[str, str] = {}  # part -> the torch.compile mode it is compiled with now
    ever: set[str] = set()  # parts compiled at least once (a recompile finds kernels in the cache)
    state = {"uattn": "auto", "batch": None, "compile_mode": None, "clconv": False}
    failed_modes: set[str] = set()
    for row in rows:
        elapsed = time.perf_counter() - t0
        cost = row_cost(row, compiled, ever, state, args) if device.type == "cuda" else 0.0
        skip = None
        if elapsed + cost > args.budget:
            skip = f"budget: {elapsed:.0f} s spent, the row needs ~{cost:.0f} s of {args.budget:.0f}"
        elif row.compiled and row.compile_mode in failed_modes:
            skip = f"compile mode {row.compile_mode} failed in an earlier row"
        if skip:
            log.info("skip %s: %s", row.spec, skip)
            results["runs"].append({"mode": row.mode, "batch": row.batch, "skipped": skip})
            args.out.write_text(json.dumps(results, indent=2))
            continue
        if row.name == "attention":
            settings = (
                args.attn_backends
                or ("auto,flash,efficient,cudnn" if device.type == "cuda" else "auto,flash,math,efficient")
            ).split(",")
            results["attention"] = bench_attention(
                model.unet, args.size, row.batch, model.text_encoder.max_positions, settings, device
            )
            args.out.write_text(json.dumps(results, indent=2))
            continue
        if row.name == "data":
            results["data"] = bench_data(model, args.size, device)
            log.info("data: %s", results["data"])
            continue
        if row.name == "profile":
            wait_for(args.wait_file)
            batch = random_batch(model, row.batch, args.size, device)
            results["profile"] = profile_step(
                full_step(method, batch, True, device, state["compile_mode"]), device, args.out
            )
            results["profile"]["state"] = {k: v for k, v in state.items() if k != "batch"} | {
                "compiled": dict(compiled),
                "batch": row.batch,
            }
            args.out.write_text(json.dumps(results, indent=2))
            continue
        want = row.compiled
        if want != compiled:
            compiled = set_compiled(model, compiled, want, backend)  # compile_model hooks the UNet
            ever |= set(want)
        set_clconv(model.unet, row.clconv)
        state.update(
            uattn=row.uattn, batch=row.batch, compile_mode=row.compile_mode if want else None, clconv=row.clconv
        )
        method.config = load_config(
            overrides=["profile=tiny", f"train.sdpa_backend={'default' if 'cudnn' in row.flags else 'no-cudnn'}"]
        )
        method.graphed_unet = GraphedUNet(model.unet) if "graphs" in row.flags and device.type == "cuda" else None
        if "legacy" in row.flags:
            model.encode_conditioning = partial(legacy_encode_conditioning, model)
        else:
            model.__dict__.pop("encode_conditioning", None)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        counters = torch._dynamo.utils.counters
        skips_before, graphs_before = counters["inductor"]["cudagraph_skips"], counters["stats"]["unique_graphs"]
        warnings.lines = []
        try:
            set_unet_attention(model.unet, row.uattn)
            if row.name.startswith("unet"):
                step = unet_step(model.unet, row.batch, args.size, device, state["compile_mode"])
            else:
                batch = random_batch(model, row.batch, args.size, device)
                step = full_step(
                    method, batch, precomputed="-pre-" in row.name, device=device, compile_mode=state["compile_mode"]
                )
            seconds, warm = time_steps(step, device, args.warmup, args.steps, args.wait_file)
        except Exception as exc:  # out of memory, or a failed capture: record it, keep the other rows
            log.exception("%s failed", row.spec)
            if want:
                failed_modes.add(row.compile_mode)
            results["runs"].append(
                {
                    "mode": row.mode,
                    "batch": row.batch,
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                    "torch_warnings": warnings.lines,
                }
            )
            args.out.write_text(json.dumps(results, indent=2))
            continue
        finally:
            step = None  # the step's optimizer state goes before the next row allocates its own
        traced = counters["stats"]["unique_graphs"] - graphs_before  # Dynamo graphs this row compiled
        skipped = counters["inductor"]["cudagraph_skips"] - skips_before  # graphs left without CUDA graphs
        record = {
            "mode": row.mode,
            "batch": row.batch,
            "samples_per_s": round(args.steps * row.batch / seconds, 1),
            "step_ms": round(1000 * seconds / args.steps, 1),
            "warmup_s": round(warm, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
            "compiled": dict(compiled),
            "unet_sdpa_backend": row.uattn,
            "clconv": row.clconv,
            "estimated_s": round(cost),
            "graphs_compiled": traced,
            "cudagraph_skips": skipped,
            "torch_warnings": warnings.lines,
        }
        results["runs"].append(record)
        log.info(
            "%-60s batch %3d  %7.1f samples/s  %7.1f ms/step  (warm-up %.0f s, peak %s GiB, cudagraph skips %d)",
            row.mode,
            row.batch,
            record["samples_per_s"],
            record["step_ms"],
            warm,
            record["peak_mem_gib"],
            record["cudagraph_skips"],
        )
        args.out.write_text(json.dumps(results, indent=2))


def row_cost(row: Row, compiled: dict[str, str], ever: set[str], state: dict, args) -> float:
    """Estimated seconds of `row` (ROW_COST_S): the compiles it triggers, then its steps."""
    if row.name in ("attention", "profile", "data"):
        return ROW_COST_S[row.name]
    cost = ROW_COST_S["fixed"] + (args.warmup + args.steps) * ROW_COST_S["step"] * row.batch / 32
    new_batch = row.batch != state["batch"]
    want = row.compiled
    unet_changed = new_batch or row.uattn != state["uattn"] or row.clconv != state["clconv"]
    if "unet" in want and (compiled.get("unet") != want["unet"] or unet_changed):
        cost += ROW_COST_S["unet_again" if "unet" in ever else "unet_first"]
    encoders = {part: mode for part, mode in want.items() if part != "unet"}
    if encoders and (any(compiled.get(part) != mode for part, mode in encoders.items()) or new_batch):
        cost += ROW_COST_S["encoders_again" if "qformer" in ever else "encoders_first"]
    return cost


def set_clconv(unet: torch.nn.Module, on: bool) -> None:
    """channels_last_convolutions' hooks on (or, for +noclconv and eager rows, off) the UNet's
    convolutions; logs only a change."""
    count = channels_last_convolutions(unet) if on else remove_channels_last_convolutions(unet)
    if count:
        log.info("clconv %s: %d convolutions", "on" if on else "off", count)


def set_compiled(model: BlipDiffusion, compiled: dict[str, str], want: dict[str, str], backend: str) -> dict[str, str]:
    """Compile the parts of `want` (part -> mode) not compiled with that mode yet; return the
    others to eager (the bench's way back from nn.Module.compile, which has no public undo)."""
    for part, mode in compiled.items():
        if want.get(part) != mode:
            getattr(model, part)._compiled_call_impl = None
            if part == "unet" and "unet" not in want:
                model.unet.to(memory_format=torch.contiguous_format)
    if any(m in CUDA_GRAPH_MODES for m in compiled.values()) and not any(m in CUDA_GRAPH_MODES for m in want.values()):
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()  # no CUDA-graph part left: free their memory pool
    new = {part: mode for part, mode in want.items() if compiled.get(part) != mode}
    for mode in dict.fromkeys(new.values()):
        compile_model(model, tuple(p for p in new if new[p] == mode), mode=mode, backend=backend)
    return dict(want)


def write_dataset(root: Path, rows: int, size: int) -> Path:
    """A published dataset version of `rows` synthetic 512 px JPEG rows (4 subjects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.versions import MANIFEST, DatasetStore, write_json_atomic
    from stages.write import DATA_SCHEMA, encode_image

    rng = np.random.default_rng(0)
    store = DatasetStore(root)
    staging = store.new_staging("v0001")
    (staging / "data").mkdir()
    subjects = ["dog", "backpack", "teddy", "sneaker"]
    width = size * 4 // 3
    # The cutout for train.composite online: the photo's colours and an ellipse of the frame's
    # middle half as the subject's alpha (a matte's soft edge costs the paste nothing more).
    yy, xx = np.mgrid[0:size, 0:width]
    ellipse = (((yy - size / 2) / (size / 4)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2 < 1).astype(np.uint8) * 255
    alpha = encode_image(ellipse)
    table = []
    for i in range(rows):
        sid = subjects[i % 4]
        photo = jpeg(synthetic_photo(rng, width, size))
        table.append(
            {
                "subject_id": sid,
                "category": sid,
                "source_uri": f"{sid}/{i}.jpg",
                "source_sha256": f"{i:064d}",
                "image": photo,
                "composite": jpeg(synthetic_photo(rng, width, size)),
                "foreground": photo,
                "alpha": alpha,
                "trimap": b"",
                "background_id": "bg",
                "seed": i,
                "composite_index": 0,
                "placement": "{}",
                "width": width,
                "height": size,
                "alpha_area": 0.5,
                "dataset_version": "v0001",
            }
        )
    for part in range(8):  # 8 shards, so Ray Data reads and decodes in parallel
        pq.write_table(
            pa.Table.from_pylist(table[part::8], schema=DATA_SCHEMA),
            staging / "data" / f"part-{part:05d}.parquet",
            row_group_size=32,
        )
    counts = {s: {"category": s, "rows": rows // 4} for s in subjects}
    write_json_atomic(staging / MANIFEST, {"version": "v0001", "rows": rows, "subjects": counts})
    return store.publish(staging, "v0001")


@dataclass
class Job:
    """One --job of --e2e: `name` (its run name is e2e-NAME), total `steps`, `log_every` (the
    job's figures are its last logging interval: steps - log_every is the warm-up left out), and
    config overrides on top of the defaults plus --gpu."""

    name: str
    steps: int
    log_every: int
    overrides: list[str]


def parse_job(spec: str) -> Job:
    """NAME:STEPS:LOG_EVERY[:KEY=VALUE,KEY=VALUE...]"""
    name, steps, every, *rest = spec.split(":", 3)
    return Job(name, int(steps), int(every), [o for o in (rest[0].split(",") if rest else []) if o])


def composite_jobs(steps: int) -> list[Job]:
    """--composite: what train.composite online costs a step. The stored composites with
    precomputed VAE posteriors and ViT features (the fastest job before online composites), the
    stored ones from pixels (ViT and VAE in the step), online from pixels (the composite pasted
    in the collate, VAE and ViT in the step), and online-pre (the targets' VAE posteriors
    precomputed, the ViT in the step). Each job's samples/s is over its last half."""
    half = max(1, steps // 2)
    return [
        Job("stored-pre", steps, half, ["train.composite=stored", "train.precompute=true"]),
        Job("stored-raw", steps, half, ["train.composite=stored", "train.precompute=false"]),
        Job("online", steps, half, ["train.composite=online", "train.precompute=false"]),
        Job("online-pre", steps, half, ["train.composite=online", "train.precompute=true"]),
    ]


def run_e2e(args, results: dict) -> None:
    """`run_training` itself on a synthetic dataset, one --job after another in one storage
    path (so later jobs find the compile cache and the precomputed inputs of earlier ones)."""
    from pipeline.train.trainer import run_training

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-pretrain-"))
    if args.pool:
        args.set.append(f"data.backgrounds.folder={synthetic_pool(work / f'pool-{args.pool}', args.pool, args.size)}")
    if not (work / "dataset").exists():
        start = time.perf_counter()
        write_dataset(work / "dataset", args.rows, args.size)
        log.info("wrote %d rows in %.0f s", args.rows, time.perf_counter() - start)
    if args.tiny:
        model_path = str(TINY)
    else:
        model_path = str(work / "model")
        if not (work / "model").exists():
            start = time.perf_counter()
            build_real(torch.device("cpu")).save_pretrained(work / "model")
            log.info("saved the real-size model in %.0f s", time.perf_counter() - start)
    gpu = torch.cuda.is_available()
    jobs = [parse_job(spec) for spec in args.job] or (
        composite_jobs(args.steps) if args.composite else [Job("defaults", args.steps, args.steps // 2, [])]
    )
    for job in jobs:
        overrides = [
            "profile=tiny",
            f"models.blip_diffusion={model_path}",
            f"train.data={work / 'dataset'}",
            f"train.storage_path={work / 'runs'}",
            f"train.run_name=e2e-{job.name}",
            f"train.workers={args.workers}",
            f"train.gpu={str(gpu).lower()}",
            f"train.batch_size={args.batch}",
            f"train.resolution={args.size}",
            f"train.steps={job.steps}",
            f"train.log_every={job.log_every}",
            f"train.checkpoint_every={job.steps}",
            "train.samples.every=0",
            "tracking.enabled=false",
            "train.warmup_steps=0",
            f"train.cpus_per_worker={args.cpus_per_worker}",
            "train.lr=1e-5",
            *args.set,
            *job.overrides,
        ]
        if gpu:
            torch.cuda.empty_cache()
        start = time.perf_counter()
        try:
            config = load_config(overrides=overrides)
            result = run_training(config)
        except Exception as exc:  # record it and go on with the next job
            log.exception("job %s failed", job.name)
            results["e2e"].append({"job": job.name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            args.out.write_text(json.dumps(results, indent=2))
            continue
        row = {
            "job": job.name,
            "overrides": job.overrides,
            "workers": args.workers,
            "batch_per_worker": config.train.batch_size,  # a job's own train.batch_size wins over --batch
            "steps": job.steps,
            "window_steps": job.log_every if job.steps % job.log_every == 0 else job.steps % job.log_every,
            "precomputed": result.dataset.precomputed,
            "wall_s": round(time.perf_counter() - start, 1),
            **{k: round(v, 4) for k, v in result.metrics.items() if isinstance(v, float)},
        }
        results["e2e"].append(row)
        log.info("e2e %s", row)
        args.out.write_text(json.dumps(results, indent=2))


def run_feed(args, results: dict) -> None:
    """The job's data feed alone, on this machine's CPUs, against a simulated step of --feed-step-s
    seconds (the GPU's time for one batch; 0.246 s is 130 samples/s at batch 32): Ray Data reads
    and maps --rows rows, batches reach the device through the loop's collate, and the wait in
    `next()` is the data-wait share the job would log. Feeds (--feeds, in order):
      pre-list    precomputed rows as Ray's tensor columns (Parquet lists), the old collate
                  (unpinned), 2 batches prefetched, one pass per Ray Data epoch
      pre-binary  precomputed rows as fixed-size binary (pipeline/train/data.py), FeedCollate
                  (page-locked), 4 prefetched, MAX_PASSES passes per epoch (the job's feed now)
      FEED@P      that feed with P passes per Ray Data epoch
      raw-old / raw-new  JPEG rows decoded by `prepare_batch` tasks (--data-cpus CPUs), old / new
      online      the cutouts decoded by `prepare_cutout_batch` tasks and composited in the
                  collate (train.composite online: on the GPU's side stream where there is one)
    """
    import pyarrow.parquet as pq
    import ray

    from pipeline.data.backgrounds import list_backgrounds
    from pipeline.train.data import (
        MAX_PASSES,
        FeedCollate,
        OnlineFeed,
        pack_tensor_columns,
        read_tensor_layout,
        repeat_passes,
    )
    from pipeline.train.dist import _Collate
    from stages.online_composite import CUTOUT_COLUMNS, OnlineCompositor, prepare_cutout_batch

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-feed-"))
    if args.pool:
        args.backgrounds = synthetic_pool(work / f"pool-{args.pool}", args.pool, args.size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ray.init(num_cpus=args.data_cpus, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not (work / "dataset").exists():
        write_dataset(work / "dataset", args.rows, args.size)
    files = sorted(str(p) for p in (work / "dataset" / "latest" / "data").glob("*.parquet"))
    latent = args.size // 8

    def encoded(batch: dict) -> dict:
        n, rng = len(batch["category"]), np.random.default_rng(len(batch["category"]))
        return {
            "category": batch["category"],
            "caption": np.array([""] * n, dtype=object),
            "latent_params": rng.standard_normal((n, 8, latent, latent), dtype=np.float32),
            "image_features": rng.standard_normal((n, 257, 1024), dtype=np.float32).astype(np.float16),
        }

    rows = ray.data.read_parquet(files, columns=["category"]).map_batches(encoded, batch_size=args.batch)
    caches = {"pre-list": work / "pre-list", "pre-binary": work / "pre-binary"}
    if not caches["pre-list"].exists():
        rows.write_parquet(str(caches["pre-list"]))
        rows.map_batches(pack_tensor_columns, batch_format="numpy", zero_copy_batch=True).write_parquet(
            str(caches["pre-binary"]), use_dictionary=["category", "caption"]
        )
    processor = SubjectImageProcessor()
    for spec in args.feeds.split(","):
        feed, _, at = spec.partition("@")  # FEED@P: P passes per Ray Data epoch
        new = feed in ("pre-binary", "raw-new", "online")
        passes = int(at) if at else MAX_PASSES if new else 1
        online = None
        if feed == "online":
            layout = {}
            ds = ray.data.read_parquet(files, columns=list(CUTOUT_COLUMNS)).map_batches(
                prepare_cutout_batch, fn_kwargs={"resolution": args.size, "crop": "random"}, batch_size=16
            )
            ds = repeat_passes(ds, passes, tag=True)
            # --backgrounds: a pool of thousands, as a real run draws from, rather than the bundled 12
            # (whose covered copies all stay in the compositor's caches).
            pool = list_backgrounds(args.backgrounds)
            compositor = OnlineCompositor(pool, seed=0, scale_min=0.4, scale_max=0.9, device=device)
            online = OnlineFeed(compositor, processor, passes)
        elif feed.startswith("pre"):
            cached = sorted(str(p) for p in caches[feed].glob("*.parquet"))
            layout = read_tensor_layout(pq.read_schema(cached[0])) if new else {}
            ds = repeat_passes(ray.data.read_parquet(cached), passes)
        else:
            layout = {}
            ds = ray.data.read_parquet(files, columns=["category", "image", "composite"]).map_batches(
                prepare_batch, fn_kwargs={"processor": processor, "resolution": args.size, "crop": "random"}, batch_size=16
            )
            ds = repeat_passes(ds, passes)
        collate = FeedCollate(layout, pin=device.type == "cuda", online=online).at_epoch(0) if new else _Collate()
        waits, start, count = 0.0, time.perf_counter(), 0
        first, step_end = None, 0.0
        while count < args.steps:
            for batch in ds.iter_torch_batches(
                batch_size=args.batch, collate_fn=collate, local_shuffle_buffer_size=256, drop_last=True, prefetch_batches=4 if new else 2
            ):
                waited = time.perf_counter()
                if count == 0:
                    first = waited - start
                    start = time.perf_counter()  # the window starts after the first batch
                else:
                    waits += waited - step_end
                tensors = [v.to(device, non_blocking=True) for v in batch.values() if isinstance(v, torch.Tensor)]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                time.sleep(max(0.0, args.feed_step_s - (time.perf_counter() - waited)))
                del tensors
                step_end = time.perf_counter()
                count += 1
                if count >= args.steps:
                    break
        seconds = time.perf_counter() - start
        row = {
            "feed": spec,
            "passes": passes,
            "batches": count - 1,
            "first_batch_s": round(first, 2),
            "samples_per_s": round((count - 1) * args.batch / seconds, 1),
            "data_wait_share": round(waits / seconds, 4),
        }
        results["feed"].append(row)
        log.info("feed %s", row)
        args.out.write_text(json.dumps(results, indent=2))


def process_start() -> float:
    """This process's start on the perf_counter clock: --budget counts the imports (~10 s) too."""
    import psutil  # a Ray dependency

    return time.perf_counter() - max(0.0, time.time() - psutil.Process().create_time())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint instead of real sizes")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="samples per step (per worker in --e2e)")
    parser.add_argument(
        "--modes", default="unet-eager,full-raw-eager,full-pre-eager,data,unet-compiled,full-pre-compiled"
    )
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode (total steps in --e2e)")
    parser.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds for the whole run: a row starts only if its estimated cost still fits",
    )
    parser.add_argument("--e2e", action="store_true", help="run the training job itself instead of step modes")
    parser.add_argument(
        "--composite", action="store_true", help="--e2e without --job: stored+precompute, stored from pixels, online composites from pixels and with precomputed targets"
    )
    parser.add_argument("--smoke", action="store_true", help="CPU check that the command runs: --tiny, 64 px, batch 2, 16 rows")
    parser.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="NAME:STEPS:LOG_EVERY[:KEY=VALUE,...]",
        help="--e2e job, repeatable, run in order in one storage path (default: one job of the defaults)",
    )
    parser.add_argument("--feed", action="store_true", help="time the job's data feed alone (see run_feed)")
    parser.add_argument("--feeds", default="pre-list,pre-binary,raw-old,raw-new")
    parser.add_argument("--feed-step-s", type=float, default=0.246, help="--feed: the simulated step's seconds")
    parser.add_argument("--data-cpus", type=int, default=8, help="--feed: CPUs for Ray Data tasks")
    parser.add_argument("--backgrounds", help="--feed online: a background pool or folder (default: the bundled set)")
    parser.add_argument(
        "--pool", type=int, default=0, help="online composites draw from N synthetic backgrounds made under --work (0: the bundled 12)"
    )
    parser.add_argument("--work", help="--e2e folder for the dataset, model and runs (reused when it exists)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=512, help="synthetic dataset rows (--e2e)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for --e2e, repeatable (train.compile_mode=reduce-overhead)",
    )
    parser.add_argument("--ablation", action="store_true", help="--preset run3 (issue 5's cumulative changes)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="--modes from PRESETS (see the module docstring)")
    parser.add_argument(
        "--attn-backends",
        help="attention mode's kernel settings, comma-separated (default: "
        "auto,flash,efficient,cudnn on a GPU, auto,flash,math,efficient on the CPU)",
    )
    parser.add_argument(
        "--compile-backend", help="torch.compile backend (default: inductor on a GPU, aot_eager on the CPU)"
    )
    parser.add_argument("--wait-file", type=Path, help="timed steps wait for this file (see the module docstring)")
    parser.add_argument("--out", type=Path, default=Path("bench_pretrain.json"))
    args = parser.parse_args()
    if args.smoke:
        args.tiny, args.size, args.batch, args.rows = True, 64, 2, min(args.rows, 16)
    if args.ablation:
        args.preset = "run3"
    if args.preset:
        args.modes = PRESETS[args.preset]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # Every thread's Python stack on a fatal signal (SIGABRT, SIGSEGV) into a file beside --out,
    # which a cut log cannot lose: an --e2e driver died of SIGABRT on an H100 and left no stack.
    # (Ray enables faulthandler for the main thread only, and only where none is on.) A crash in
    # Ray's C++ threads is in /tmp/ray/session_latest/logs/python-core-driver-<pid>.log.
    faulthandler.enable(args.out.with_suffix(".faults.txt").open("w"), all_threads=True)
    t0 = process_start()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    import diffusers
    import transformers

    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "settings": {k: str(v) for k, v in vars(args).items()},
        "runs": [],
        "e2e": [],
        "feed": [],
    }
    if args.feed:
        run_feed(args, results)
    elif args.e2e:
        run_e2e(args, results)
    else:
        run_modes(args, device, results, t0)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
