"""Do ATen kernels called from the compiled pretraining step copy their inputs into another layout?

Issue 18: the compiled step (reduce-overhead, UNet channels-last, cuDNN attention) launches
over a hundred generic `at::native::elementwise_kernel<128, 4, ...>` kernels per step inside its
CUDA graphs. Inductor writes its own copies as Triton kernels, so those come from ATen ops that
Inductor calls as extern kernels and that copy internally. This check runs those ops eagerly (no
torch.compile), at the UNet's real shapes, under the layouts a compiled graph could hand them, and
counts the kernels each fwd+bwd launches besides the op's own:

  sdpa   `F.scaled_dot_product_attention` forward + backward per attention shape of the UNet,
         kernel (cudnn, flash), q/k/v layout (`diffusers`: a (b, s, h*d) projection viewed as
         (b, s, h, d) and transposed, as AttnProcessor2_0 makes them; `contiguous`: (b, h, s, d)
         memory) and output-gradient layout (`bshd`: what `.transpose(1, 2).reshape(b, s, h*d)`
         gives back; `bhsd`: contiguous).
  chain  the processor's own chain: to_q/to_k/to_v -> view/transpose -> SDPA ->
         transpose/reshape -> to_out, forward + backward, so the output gradient gets the layout
         autograd really gives it; q/k/v `diffusers` or made `contiguous` after the transpose.
         Eagerly the chain's own layout changes (`.contiguous()`, the reshape's copy) are ATen
         copies too; compiled they are Triton kernels: only the `in op` ones carry over.
  conv   each distinct convolution of the UNet, channels-last weight, forward + backward under
         CONV_VARIANTS: input channels-last or contiguous NCHW (diffusers' training-mode
         `.contiguous()` before ResnetBlock2D.conv_shortcut and Transformer2DModel's before
         proj_out make NCHW inputs), output gradient channels-last, NCHW (what a Triton kernel
         may produce) or a channel slice of a channels-last tensor (torch.cat's backward in the
         up blocks). compile_model sets conv_1x1_as_mm, which makes the forward of a 1x1
         convolution a matrix product; its backward (traced before lowering) stays
         `aten.convolution_backward`, so 1x1 shapes count in the per-step totals.

Per case: kernels per call besides the op's compute, split into `generic` (the profile's
`at::native::elementwise_kernel<...>`) and `copies` (generic ones, memcpys and any kernel an
`aten::copy_`/`clone`/`contiguous` launched), their device microseconds per call, how many were
launched from inside the SDPA/convolution op itself (`in op`), how many in the backward (`bwd`:
compiled, a convolution's forward input is laid out by Inductor, its backward's by the FX
graph's strides), and fwd+bwd ms (median of --iters after --warmup, CUDA events). The per-step
totals weight each shape by its calls in one training step (the attention and convolution calls
of one UNet forward at --size, recorded from a real SD 1.5 UNet with random weights) as if every
call got that case's layouts: per variant, an upper bound to compare with the profile's generic
launches per step; which calls get which layout in the compiled graphs is not known here.

    python benchmarks/check_layout_copies.py --out layout_copies.json                  # H100, ~2 min
    python benchmarks/check_layout_copies.py --device cpu --smoke --out /tmp/lc.json   # CPU dry run

--families (sdpa, chain, conv) and --backends narrow a run. On the CPU (--smoke: the tiny
UNet's shapes, batch 2, float32, profiler on the CPU only) the "kernels" are `aten::copy_` calls
and cuDNN cases fail by design: the dry run checks that every path runs, its counts mean little.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT", str(REPO)))

from pipeline.train.speed import UNET_SDPA_BACKENDS  # noqa: E402

TINY_UNET = REPO / "pipeline" / "assets" / "tiny-blipdiffusion" / "unet"
TEXT_LEN = 77  # CLIP's prompt length: the cross-attention key length
GENERIC = "at::native::elementwise_kernel<"  # the profile's kernel (not the vectorized/unrolled ones)
COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous")
# (input, output gradient) layouts of the conv cases; see conv_case.
CONV_VARIANTS = (
    ("channels_last", "channels_last"),
    ("channels_last", "nchw"),
    ("channels_last", "slice"),
    ("nchw", "channels_last"),
    ("nchw", "nchw"),
)
IN_OP = {
    "sdpa": re.compile(r"scaled_?dot_?product|_attention", re.IGNORECASE),
    "chain": re.compile(r"scaled_?dot_?product|_attention", re.IGNORECASE),
    "conv": re.compile(r"convolution", re.IGNORECASE),
}


# ---------------------------------------------------------------------------------------------
# The UNet's calls


@dataclass(frozen=True)
class AttnShape:
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    kv_width: int  # channels of what to_k/to_v read: the layer's own width, or the text states'

    @property
    def cross(self) -> bool:
        return self.kv_width != self.heads * self.head_dim


@dataclass(frozen=True)
class ConvShape:
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    height: int
    width: int
    groups: int
    input_grad: bool  # the first convolution reads the latents, which need no gradient

    @property
    def as_mm(self) -> bool:
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _RecordCalls(TorchFunctionMode):
    """Records every SDPA and conv2d call's shape, as bench_pretrain's `_RecordAttention` does."""

    def __init__(self) -> None:
        super().__init__()
        self.attention: list[AttnShape] = []
        self.conv: list[ConvShape] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k = args[0], args[1]
            self.attention.append(AttnShape(q.shape[1], q.shape[2], k.shape[2], q.shape[3], 0))
        elif func is F.conv2d:
            x, w = args[0], args[1]
            stride, padding, _, groups = (list(args[3:]) + [1, 0, 1, 1][len(args[3:]) :])[:4]
            self.conv.append(
                ConvShape(
                    x.shape[1], w.shape[0], tuple(w.shape[2:]), _pair(stride), _pair(padding),
                    x.shape[2], x.shape[3], groups, input_grad=bool(self.conv),
                )
            )
        return func(*args, **kwargs)


def build_unet(smoke: bool, device: torch.device) -> UNet2DConditionModel:
    """SD 1.5's UNet with random weights (as bench_pretrain's build_real), or the tiny test UNet."""
    with torch.device(device):
        if smoke:
            return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(TINY_UNET))
        return UNet2DConditionModel(cross_attention_dim=768, sample_size=64)


def record_unet_calls(unet: UNet2DConditionModel, size: int, device: torch.device):
    """(attention shapes, conv shapes), each a Counter of its calls in one forward at `size` px.
    Cross-attention shows as a key length of TEXT_LEN read from the text states' width."""
    record = _RecordCalls()
    latents = torch.randn(1, unet.config.in_channels, size // 8, size // 8, device=device)
    states = torch.randn(1, TEXT_LEN, unet.config.cross_attention_dim, device=device)
    with torch.no_grad(), record:
        unet(latents, torch.tensor([500], device=device), encoder_hidden_states=states)
    attention = collections.Counter(
        AttnShape(
            a.heads, a.q_len, a.kv_len, a.head_dim,
            unet.config.cross_attention_dim if a.kv_len == TEXT_LEN and a.q_len != TEXT_LEN else a.heads * a.head_dim,
        )
        for a in record.attention
    )
    return attention, collections.Counter(record.conv)


def auto_pick(s: AttnShape, batch: int, dtype, device) -> str:
    """PyTorch's kernel for `auto` on diffusers' q/k/v layout (a private API: informative only)."""
    probe = [
        torch.zeros(batch, n, s.heads, s.head_dim, device=device, dtype=dtype, requires_grad=True).transpose(1, 2)
        for n in (s.q_len, s.kv_len, s.kv_len)
    ]
    try:
        return SDPBackend(torch._fused_sdp_choice(*probe)).name
    except Exception:  # private API
        return "?"


# ---------------------------------------------------------------------------------------------
# Cases: each builds its tensors and returns one fwd+bwd callable


@dataclass
class Case:
    family: str  # sdpa, chain, conv
    shape: AttnShape | ConvShape
    variant: dict[str, str]
    calls_per_step: int
    build: Callable[[], Callable[[], None]]
    result: dict = field(default_factory=dict)

    def describe(self) -> str:
        s = self.shape
        if isinstance(s, AttnShape):
            shape = f"h{s.heads} q{s.q_len} kv{s.kv_len} d{s.head_dim}"
        else:
            shape = f"{s.c_in}->{s.c_out} k{s.kernel[0]} s{s.stride[0]} {s.height}x{s.width}"
        return f"{self.family:5s} {shape:26s} {variant_text(self.variant):42s}"


def variant_text(variant: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in variant.items())


def _kernels(backend: str) -> contextlib.AbstractContextManager:
    backends = UNET_SDPA_BACKENDS[backend]
    return sdpa_kernel(backends) if backends is not None else contextlib.nullcontext()


def _heads(t: torch.Tensor, batch: int, heads: int, dim: int, layout: str) -> torch.Tensor:
    """AttnProcessor2_0's `.view(b, -1, h, d).transpose(1, 2)`, made contiguous for `contiguous`."""
    view = t.view(batch, -1, heads, dim).transpose(1, 2)
    return view.contiguous() if layout == "contiguous" else view


def sdpa_case(s: AttnShape, backend: str, qkv: str, grad: str, batch: int, dtype, device) -> Callable[[], None]:
    def tensor(length: int, layout: str, requires_grad: bool) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
        if layout in ("diffusers", "bshd"):
            base = torch.randn(batch, length, s.heads, s.head_dim, device=device, dtype=dtype)
            base.requires_grad_(requires_grad)
            return base, lambda: base.transpose(1, 2)
        base = torch.randn(batch, s.heads, length, s.head_dim, device=device, dtype=dtype)
        base.requires_grad_(requires_grad)
        return base, lambda: base

    leaves = [tensor(n, qkv, True) for n in (s.q_len, s.kv_len, s.kv_len)]
    grad_out = tensor(s.q_len, grad, False)[1]()

    def run() -> None:
        with _kernels(backend):
            out = F.scaled_dot_product_attention(*(view() for _, view in leaves))
        torch.autograd.grad(out, [base for base, _ in leaves], grad_out)

    return run


def chain_case(s: AttnShape, backend: str, layout: str, batch: int, dtype, device) -> Callable[[], None]:
    """AttnProcessor2_0 on (b, s, c) hidden states, bf16 weights (the step's autocast copies)."""
    width = s.heads * s.head_dim
    with torch.device(device):
        to_q, to_k, to_v = (nn.Linear(n, width, bias=False) for n in (width, s.kv_width, s.kv_width))
        to_out = nn.Linear(width, width)
    layers = nn.ModuleList([to_q, to_k, to_v, to_out]).to(dtype)
    hidden = torch.randn(batch, s.q_len, width, device=device, dtype=dtype, requires_grad=True)
    context = torch.randn(batch, s.kv_len, s.kv_width, device=device, dtype=dtype, requires_grad=True) if s.cross else None
    grad_out = torch.randn(batch, s.q_len, width, device=device, dtype=dtype)
    inputs = [hidden] + ([context] if s.cross else []) + list(layers.parameters())

    def run() -> None:
        source = context if s.cross else hidden
        q, k, v = (_heads(f(x), batch, s.heads, s.head_dim, layout) for f, x in ((to_q, hidden), (to_k, source), (to_v, source)))
        with _kernels(backend):
            out = F.scaled_dot_product_attention(q, k, v)
        out = to_out(out.transpose(1, 2).reshape(batch, -1, width))
        torch.autograd.grad(out, inputs, grad_out)

    return run


def conv_case(s: ConvShape, layout: str, grad: str, batch: int, dtype, device) -> Callable[[], None]:
    """F.conv2d forward + backward, channels-last weight; input and output gradient `channels_last`
    or contiguous `nchw`, the gradient also `slice`: the first c_out channels of a channels-last
    gradient twice as wide (what the backward of the up blocks' torch.cat hands back)."""
    channels_last = torch.channels_last
    x = torch.randn(batch, s.c_in, s.height, s.width, device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=channels_last)
    weight = torch.randn(s.c_out, s.c_in // s.groups, *s.kernel, device=device, dtype=dtype)
    weight = weight.contiguous(memory_format=channels_last).requires_grad_()
    bias = torch.randn(s.c_out, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        out_shape = F.conv2d(x, weight, bias, s.stride, s.padding, 1, s.groups).shape
    x.requires_grad_(s.input_grad)
    if grad == "slice":
        wide = torch.randn(out_shape[0], 2 * out_shape[1], *out_shape[2:], device=device, dtype=dtype)
        grad_out = wide.contiguous(memory_format=channels_last)[:, : out_shape[1]]
    else:
        grad_out = torch.randn(out_shape, device=device, dtype=dtype)
    if grad == "channels_last":
        grad_out = grad_out.contiguous(memory_format=channels_last)
    inputs = ([x] if s.input_grad else []) + [weight, bias]

    def run() -> None:
        out = F.conv2d(x, weight, bias, s.stride, s.padding, 1, s.groups)
        torch.autograd.grad(out, inputs, grad_out)

    return run


def build_cases(attention, conv, backends: list[str], batch: int, dtype, device) -> list[Case]:
    cases = []
    for s, count in sorted(attention.items(), key=lambda item: (-item[0].q_len, item[0].kv_len)):
        for backend in backends:
            for qkv, grad in (("diffusers", "bshd"), ("diffusers", "bhsd"), ("contiguous", "bhsd"), ("contiguous", "bshd")):
                build = partial(sdpa_case, s, backend, qkv, grad, batch, dtype, device)
                cases.append(Case("sdpa", s, {"backend": backend, "qkv": qkv, "grad": grad}, count, build))
            for layout in ("diffusers", "contiguous"):
                build = partial(chain_case, s, backend, layout, batch, dtype, device)
                cases.append(Case("chain", s, {"backend": backend, "qkv": layout}, count, build))
    for s, count in sorted(conv.items(), key=lambda item: (-item[0].height, item[0].c_in, item[0].c_out)):
        for layout, grad in CONV_VARIANTS:
            build = partial(conv_case, s, layout, grad, batch, dtype, device)
            cases.append(Case("conv", s, {"input": layout, "grad": grad}, count, build))
    return cases


# ---------------------------------------------------------------------------------------------
# Measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_ms(run: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        run()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            run()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def _owners(event) -> list[str]:
    """The op that launched a kernel, then its callers, innermost first."""
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names


def launches(run: Callable[[], None], device: torch.device, calls: int) -> list[tuple[str, float, list[str]]]:
    """(kernel name, device µs, owning ops) of every kernel `calls` calls of `run` launch. On the
    CPU: the `aten::copy_` calls, with their CPU µs (the dry run's stand-in)."""
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            run()
        sync(device)
    events = prof.events()
    if device.type != "cuda":
        return [(e.name, e.self_cpu_time_total, _owners(e)) for e in events if e.name == "aten::copy_"]
    # Each op's `kernels` are the device kernels the profiler tied to it (by correlation id);
    # FunctionEvent.linked_correlation_id, which this read first, is not there in torch 2.11.
    return [
        (kernel.name, kernel.duration, _owners(op))
        for op in events
        if op.device_type == torch.autograd.DeviceType.CPU
        for kernel in op.kernels
    ]


def classify(family: str, found: list[tuple[str, float, list[str]]], calls: int, device: torch.device) -> dict:
    """Per call: generic elementwise kernels and copies (counts, µs, how many inside the op), and
    every kernel seen grouped by name and owner."""
    totals = {
        kind: {"per_call": 0.0, "us_per_call": 0.0, "in_op_per_call": 0.0, "bwd_per_call": 0.0}
        for kind in ("generic", "copies")
    }
    groups: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for name, us, owners in found:
        generic = GENERIC in name or device.type != "cuda"
        copy = generic or "Memcpy" in name or any(o in COPY_OPS for o in owners)
        in_op = any(IN_OP[family].search(o) for o in owners)
        bwd = any(o.startswith("autograd::engine::evaluate_function") for o in owners)
        for kind, hit in (("generic", generic), ("copies", copy)):
            if hit:
                totals[kind]["per_call"] += 1 / calls
                totals[kind]["us_per_call"] += us / calls
                totals[kind]["in_op_per_call"] += in_op / calls
                totals[kind]["bwd_per_call"] += bwd / calls
        groups[(name[:140], " < ".join(owners[:5]))].append(us)
    for kind in totals.values():
        for key, value in kind.items():
            kind[key] = round(value, 2 if key != "us_per_call" else 1)
    kernels = [
        {"name": name, "owners": owners, "per_call": round(len(us) / calls, 2), "us_per_call": round(sum(us) / calls, 1)}
        for (name, owners), us in sorted(groups.items(), key=lambda item: -sum(item[1]))
    ]
    return {**totals, "kernels": kernels}


def measure(case: Case, device: torch.device, warmup: int, iters: int, profiled: int) -> dict:
    try:
        run = case.build()
        ms = median_ms(run, device, warmup, iters)
        return {"fwd_bwd_ms": round(ms, 3), **classify(case.family, launches(run, device, profiled), profiled, device)}
    except (RuntimeError, ValueError) as exc:  # no kernel of that kind for these inputs or this device
        return {"error": str(exc).strip().splitlines()[0][:200]}


# ---------------------------------------------------------------------------------------------
# Report


def per_step(cases: list[Case]) -> list[dict]:
    """Per family and variant: the sum over shapes of calls per step x the per-call figures."""
    groups: dict[tuple, list[Case]] = collections.defaultdict(list)
    for case in cases:
        groups[(case.family, tuple(case.variant.items()))].append(case)
    rows = []
    for (family, variant), members in groups.items():
        ok = [c for c in members if "error" not in c.result]
        row = {"family": family, **dict(variant), "calls_per_step": sum(c.calls_per_step for c in ok)}
        row["calls_without_result"] = sum(c.calls_per_step for c in members) - row["calls_per_step"]
        for kind in ("generic", "copies"):
            row[f"{kind}_per_step"] = round(sum(c.calls_per_step * c.result[kind]["per_call"] for c in ok), 1)
            for part in ("in_op", "bwd"):
                row[f"{kind}_{part}_per_step"] = round(sum(c.calls_per_step * c.result[kind][f"{part}_per_call"] for c in ok), 1)
            row[f"{kind}_ms_per_step"] = round(sum(c.calls_per_step * c.result[kind]["us_per_call"] for c in ok) / 1000, 2)
        row["fwd_bwd_ms_per_step"] = round(sum(c.calls_per_step * c.result["fwd_bwd_ms"] for c in ok), 2)
        rows.append(row)
    return rows


def print_cases(cases: list[Case]) -> None:
    print(f"{'case':76s} {'x/step':>6s} {'generic':>8s} {'in op':>6s} {'bwd':>6s} {'µs':>8s} {'copies':>7s} {'µs':>8s} {'fwd+bwd ms':>10s}")
    for case in cases:
        r = case.result
        head = f"{case.describe()} {case.calls_per_step:6d}"
        if "error" in r:
            print(f"{head}  error: {r['error'][:90]}")
            continue
        g, c = r["generic"], r["copies"]
        print(
            f"{head} {g['per_call']:8.2f} {g['in_op_per_call']:6.2f} {g['bwd_per_call']:6.2f} {g['us_per_call']:8.1f} "
            f"{c['per_call']:7.2f} {c['us_per_call']:8.1f} {r['fwd_bwd_ms']:10.3f}"
        )
        for k in r["kernels"]:
            if GENERIC in k["name"] or any(o in k["owners"] for o in COPY_OPS) or "Memcpy" in k["name"]:
                print(f"      {k['per_call']:5.2f} x {k['us_per_call']:8.1f} µs  {k['name'][:70]}  <  {k['owners'][:110]}")


def print_per_step(rows: list[dict]) -> None:
    print("\nper training step (calls weighted by their count in one UNet forward):")
    print(f"{'family':6s} {'variant':42s} {'calls':>6s} {'generic':>8s} {'in op':>6s} {'bwd':>6s} {'ms':>7s} {'copies':>7s} {'ms':>7s} {'fwd+bwd ms':>10s}")
    for r in rows:
        variant = variant_text({k: v for k, v in r.items() if k in ("backend", "qkv", "grad", "input")})
        missing = f"  ({r['calls_without_result']} calls failed)" if r["calls_without_result"] else ""
        print(
            f"{r['family']:6s} {variant:42s} {r['calls_per_step']:6d} {r['generic_per_step']:8.1f} "
            f"{r['generic_in_op_per_step']:6.1f} {r['generic_bwd_per_step']:6.1f} {r['generic_ms_per_step']:7.2f} {r['copies_per_step']:7.1f} "
            f"{r['copies_ms_per_step']:7.2f} {r['fwd_bwd_ms_per_step']:10.2f}{missing}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="CPU dry run: the tiny UNet's shapes, batch 2, 64 px")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=512, help="image px (latents: size / 8)")
    parser.add_argument("--backends", default="cudnn,flash", help=f"SDPA kernels, of {','.join(UNET_SDPA_BACKENDS)}")
    parser.add_argument("--families", default="sdpa,chain,conv")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10, help="timed fwd+bwd per case (median)")
    parser.add_argument("--profiled", type=int, default=2, help="profiled fwd+bwd per case (counts are per call)")
    parser.add_argument("--out", type=Path, default=Path("layout_copies.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --smoke", file=sys.stderr)
        return 2
    backends = args.backends.split(",")
    unknown = [b for b in backends if b not in UNET_SDPA_BACKENDS]
    if unknown:
        print(f"unknown --backends {unknown} (of {', '.join(UNET_SDPA_BACKENDS)})", file=sys.stderr)
        return 2
    if args.smoke:
        args.batch, args.size, args.warmup, args.iters, args.profiled = 2, 64, 1, 2, 1
    torch.backends.cudnn.benchmark = True  # as the training loop
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()

    attention, conv = record_unet_calls(build_unet(args.smoke, device), args.size, device)
    families = set(args.families.split(","))
    cases = [c for c in build_cases(attention, conv, backends, args.batch, dtype, device) if c.family in families]
    shapes = {
        "attention": [vars(s) | {"calls_per_step": n, "auto_picks": auto_pick(s, args.batch, dtype, device)} for s, n in attention.items()],
        "conv": [vars(s) | {"calls_per_step": n, "forward_as_mm_in_compiled_step": s.as_mm} for s, n in conv.items()],
    }
    print(f"{sum(attention.values())} attention calls ({len(attention)} shapes), {sum(conv.values())} convolutions "
          f"({len(conv)} shapes) per UNet forward; {len(cases)} cases")
    for row in shapes["attention"]:
        print("  attention", {k: row[k] for k in ("heads", "q_len", "kv_len", "head_dim", "calls_per_step", "auto_picks")})
    for case in cases:
        case.result = measure(case, device, args.warmup, args.iters, args.profiled)
    rows = per_step(cases)
    print_cases(cases)
    print_per_step(rows)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "batch": args.batch,
        "size": args.size,
        "dtype": str(dtype),
        "seconds": round(time.perf_counter() - start, 1),
        "shapes": shapes,
        "per_step": rows,
        "cases": [
            {"family": c.family, "shape": vars(c.shape) | {"cross": getattr(c.shape, "cross", None)},
             **c.variant, "calls_per_step": c.calls_per_step, **c.result}
            for c in cases
        ],
    }
    args.out.write_text(json.dumps(report, indent=1, default=list))
    print(f"\n{report['seconds']} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
