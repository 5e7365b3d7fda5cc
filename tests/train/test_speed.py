"""The training step's speed settings (pipeline/train/speed.py) and the fixed-shape conditioning
they rely on; the CUDA-graph path itself needs a GPU (benchmarks/bench_finetune.py), and so do
train.compile_mode's CUDA graphs (benchmarks/bench_pretrain.py --preset run4)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import typing
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.config import ASSETS_DIR, ConfigError, TrainConfig, load_config
from pipeline.model import BlipDiffusion
from pipeline.train import dist, hooks, loop
from pipeline.train.data import DatasetInfo, precompute_cache, precompute_ready
from pipeline.train.hooks import Hook, RunInfo
from pipeline.train.speed import (
    COMPILE_MODES,
    CUDA_GRAPHS_MAX_BATCH,
    UNET_SDPA_BACKENDS,
    UNetAttention,
    attention_kernels,
    channels_last_convolutions,
    compile_model,
    remove_channels_last_convolutions,
    resolve_compile,
    resolve_precompute,
    resolve_speed_settings,
    set_unet_attention,
    step_begin,
    use_cuda_graphs,
)
from stages.records import CATEGORY
from stages.train_inputs import CAPTION, IMAGE_FEATURES, LATENT_PARAMS

TINY = ASSETS_DIR / "tiny-blipdiffusion"


def test_cuda_graphs_only_where_they_are_safe():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_cuda_graphs(True, cuda, world_size=1, grad_accum=1, compiled=False)
    assert not use_cuda_graphs(True, cpu, world_size=1, grad_accum=1, compiled=False)
    assert not use_cuda_graphs(True, cuda, world_size=2, grad_accum=1, compiled=False)
    assert not use_cuda_graphs(True, cuda, world_size=1, grad_accum=4, compiled=False)
    assert not use_cuda_graphs(True, cuda, world_size=1, grad_accum=1, compiled=True)
    assert not use_cuda_graphs(False, cuda, world_size=1, grad_accum=1, compiled=False)


@pytest.mark.parametrize(
    ("setting", "batch", "expected"),
    [("auto", 3, True), ("auto", CUDA_GRAPHS_MAX_BATCH, True), ("auto", CUDA_GRAPHS_MAX_BATCH + 1, False), ("auto", 48, False),
     (True, 48, True), (False, 3, False)],
)
def test_cuda_graphs_auto_is_for_small_batches(setting, batch, expected):
    """`train.cuda_graphs: auto` (the default) captures the eager UNet only at fine-tuning's small
    batches: at pretraining's, the graphs' private memory pool sits beside the rest of the step
    (a 20-step eager pretrain at batch 48 ran out of an H100's 80 GB on its second step), and
    the kernels, not their launches, bound the step. True still forces them."""
    cuda = torch.device("cuda")
    assert use_cuda_graphs(setting, cuda, world_size=1, grad_accum=1, compiled=False, batch_size=batch) is expected
    assert TrainConfig.model_validate({"cuda_graphs": setting}).cuda_graphs == setting


def test_cuda_graphs_default_is_auto():
    assert TrainConfig().cuda_graphs == "auto"


def test_unknown_attention_backend_is_an_error():
    with attention_kernels("no-cudnn"), attention_kernels("default"):
        pass
    with pytest.raises(ValueError, match="bogus"):
        attention_kernels("bogus")


def test_dropped_rows_give_the_qformer_no_gradient():
    """Every row goes through the Q-Former now; a dropped row must still not train it."""
    model = BlipDiffusion.from_pretrained(TINY).train()
    size = model.qformer.image_size
    pixels = torch.randn(2, 3, size, size)
    hidden = model.encode_conditioning(
        pixels, ["dog", "teddy bear"], ["a dog", "a teddy bear"], torch.tensor([True, False])
    )
    hidden[0].sum().backward(retain_graph=True)
    assert model.qformer.query_tokens.grad is not None and model.qformer.query_tokens.grad.abs().sum() == 0
    hidden[1].sum().backward()
    assert model.qformer.query_tokens.grad.abs().sum() > 0


@torch.no_grad()
def test_padded_category_text_leaves_subject_embeddings_unchanged():
    """Category ids are padded to a multiple of 16 (fixed shapes); padding is masked out."""
    model = BlipDiffusion.from_pretrained(TINY)
    size = model.qformer.image_size
    pixels = torch.randn(1, 3, size, size)
    text = model.qformer_tokenizer(["teddy bear"], return_tensors="pt")
    assert text.input_ids.shape[1] < 16
    unpadded = model.qformer(pixels, text.input_ids, text.attention_mask)
    torch.testing.assert_close(model.subject_embeddings(pixels, ["teddy bear"]), unpadded, rtol=1e-5, atol=1e-5)


# --- train.compile_mode and train.unet_sdpa_backend

CPU_FLASH = "aten._scaled_dot_product_flash_attention_for_cpu"


class _Ops(TorchDispatchMode):
    """Counts the aten ops that run (forward and backward, after autograd)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_config_settings_are_speed_settings():
    hints = typing.get_type_hints(TrainConfig)
    assert typing.get_args(hints["compile_mode"]) == ("auto", *COMPILE_MODES)
    assert typing.get_args(hints["unet_sdpa_backend"]) == tuple(UNET_SDPA_BACKENDS)
    train = load_config().train
    assert (train.compile, train.compile_mode, train.precompute, train.unet_sdpa_backend) == ("auto",) * 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.compile_mode=fast"], r"train\.compile_mode: Input should be 'auto', 'default', 'reduce-overhead'"),
        (["train.compile=sometimes"], r"train\.compile"),
        (["train.unet_sdpa_backend=xformers"], r"train\.unet_sdpa_backend: Input should be 'auto', 'flash'"),
        (["train.unet_sdpa_backend=efficient"], r"unet_sdpa_backend 'efficient' has no CPU kernel"),
        (["train.gpu=true", "train.mixed_precision='no'", "train.unet_sdpa_backend=flash"], r"needs bf16 autocast"),
    ],
)
def test_bad_speed_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def _unet_ops(unet: torch.nn.Module, grad: bool = True) -> dict[str, int]:
    x, t, states = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 77, unet.config.cross_attention_dim)
    with _Ops() as ops, torch.set_grad_enabled(grad):
        out = unet(x, t, encoder_hidden_states=states).sample
        if grad:
            out.sum().backward()
    return ops.counts


def test_unet_attention_setting_picks_the_kernel():
    unet = BlipDiffusion.from_pretrained(TINY).unet
    layers = sum(isinstance(m, Attention) for m in unet.modules())
    # On the CPU PyTorch picks its flash kernel for these inputs; "math" must take it away.
    assert _unet_ops(unet)[CPU_FLASH] == layers
    assert set_unet_attention(unet, "math") == layers
    assert all(type(p) is UNetAttention for p in unet.attn_processors.values())
    ops = _unet_ops(unet)
    assert CPU_FLASH not in ops and f"{CPU_FLASH}_backward" not in ops and ops["aten._safe_softmax"] == layers
    # Calls without gradients (samples, generation) keep PyTorch's choice.
    assert _unet_ops(unet, grad=False)[CPU_FLASH] == layers
    set_unet_attention(unet, "flash")
    ops = _unet_ops(unet)
    assert ops[CPU_FLASH] == ops[f"{CPU_FLASH}_backward"] == layers
    set_unet_attention(unet, "auto")
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())
    with pytest.raises(ValueError, match="no CPU kernel"):
        set_unet_attention(unet, "efficient")


def test_unet_attention_setting_holds_inside_a_compiled_module():
    """torch.compile fixes the kernel when it traces: the setting must be in the traced graph,
    and a new setting must trace again (a context around the call would do neither)."""
    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=16)
    graphs: list[set[str]] = []

    def record(gm, example_inputs):
        from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

        def keep(graph, _):
            graphs.append({str(n.target) for n in graph.graph.nodes if n.op == "call_function"})
            return make_boxed_func(graph.forward)

        return aot_module_simplified(gm, example_inputs, fw_compiler=keep, bw_compiler=keep)

    compiled = torch.compile(block, backend=record)
    x, context = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    for setting, kernel in (("flash", f"{CPU_FLASH}.default"), ("math", "aten._safe_softmax.default")):
        set_unet_attention(block, setting)
        graphs.clear()
        out = compiled(x, encoder_hidden_states=context)
        out.sum().backward()
        assert graphs and kernel in graphs[0], f"{setting}: {graphs}"
        torch.testing.assert_close(out, block(x, encoder_hidden_states=context), rtol=1e-5, atol=1e-5)
    graphs.clear()
    set_unet_attention(block, "flash")  # back to a setting traced before: no new trace, its graph
    compiled(x, encoder_hidden_states=context)
    assert graphs == []


def test_compile_model_takes_a_mode():
    model = BlipDiffusion.from_pretrained(TINY)
    compile_model(model, ("qformer",), mode="reduce-overhead", backend="aot_eager")
    assert model.qformer._compiled_call_impl is not None and model.unet._compiled_call_impl is None
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_model(model, ("unet",), mode="fast")


def test_compile_model_hands_the_unets_convolutions_channels_last_arguments():
    """Issue 18: the compiled UNet is channels-last, and its convolutions take channels-last
    inputs and gradients (channels_last_convolutions), as the measured step did."""
    model = BlipDiffusion.from_pretrained(TINY)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.unet.modules())
    compile_model(model, ("unet",), backend="aot_eager")
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert channels_last_convolutions(model.unet) == 0  # every convolution already hooked
    assert remove_channels_last_convolutions(model.unet) == convs


# --- channels_last_convolutions (issue 18: cuDNN's convolution backward copying NCHW arguments)

CL = torch.channels_last


def _tiny_unet_channels_last() -> torch.nn.Module:
    """The tiny UNet in training mode and channels-last, as compile_model leaves the real one."""
    return UNet2DConditionModel.from_pretrained(TINY / "unet").train().to(memory_format=CL)


def _unet_inputs(unet: torch.nn.Module) -> tuple:
    """Latents (channels-last, as the step makes them), timesteps, text states, and an output
    gradient in channels-last, as a compiled UNet's backward receives it (its traced layout).
    16x16 latents: the lowest blocks stay above 1x1, where NCHW and channels-last coincide."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen).contiguous(memory_format=CL)  # 2x2 at the bottom
    states = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    grad = torch.randn(2, 4, 16, 16, generator=gen).contiguous(memory_format=CL)
    return x, torch.tensor([1, 500]), states, grad


class _ConvBackwardLayouts(TorchDispatchMode):
    """Each convolution backward's (module, output gradient channels-last?, input channels-last?)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.names = {m.weight.data_ptr(): n for n, m in unet.named_modules() if isinstance(m, torch.nn.Conv2d)}
        self.calls: list[tuple[str, bool, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution_backward.default:
            grad, x, weight = args[:3]
            self.calls.append(
                (self.names[weight.data_ptr()], grad.is_contiguous(memory_format=CL), x.is_contiguous(memory_format=CL))
            )
        return func(*args, **(kwargs or {}))


def _layouts(unet: torch.nn.Module) -> tuple[dict[str, bool], list[tuple[str, bool, bool]]]:
    """One training forward and backward: whether each convolution received a channels-last input
    (recorded by a forward pre-hook registered last, so after any of channels_last_convolutions'),
    and each convolution backward's layouts."""
    inputs: dict[str, bool] = {}
    handles = [
        conv.register_forward_pre_hook(
            lambda m, args, name=name: inputs.update({name: args[0].is_contiguous(memory_format=CL)})
        )
        for name, conv in unet.named_modules()
        if isinstance(conv, torch.nn.Conv2d)
    ]
    x, t, states, grad = _unet_inputs(unet)
    with _ConvBackwardLayouts(unet) as backward:
        unet(x, t, encoder_hidden_states=states).sample.backward(grad)
    for handle in handles:
        handle.remove()
    return inputs, backward.calls


def test_channels_last_convolutions_give_every_convolution_channels_last_arguments():
    """diffusers hands some convolutions NCHW inputs in training (ResnetBlock2D's .contiguous()
    before conv_shortcut, Transformer2DModel's before proj_out) and some a channel slice of
    torch.cat's gradient (Upsample2D.conv, proj_out in the up blocks); with the hooks every
    convolution's input and output gradient is channels-last, forward and backward."""
    unet = _tiny_unet_channels_last()
    inputs, backward = _layouts(unet)
    nchw_inputs = {name for name, cl in inputs.items() if not cl}
    assert {n.rsplit(".", 1)[-1] for n in nchw_inputs} == {"conv_shortcut", "proj_out"}
    assert any(name.endswith("upsamplers.0.conv") and not grad_cl for name, grad_cl, _ in backward)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    assert channels_last_convolutions(unet) == convs
    assert channels_last_convolutions(unet) == 0  # idempotent
    inputs, backward = _layouts(unet)
    assert len(inputs) == convs and all(inputs.values()), [n for n, cl in inputs.items() if not cl]
    assert len(backward) == convs and all(g and x for _, g, x in backward), [c for c in backward if not all(c[1:])]
    assert remove_channels_last_convolutions(unet) == convs
    assert not all(_layouts(unet)[0].values())


def test_channels_last_convolutions_keep_outputs_and_gradients():
    """Only layouts change: the UNet's output and every parameter's gradient, float32, are the
    same with and without the hooks (exactly on this CPU; a layout may change a kernel's
    summation order, so a GPU may differ in the last bits)."""
    unet = _tiny_unet_channels_last()
    hooked = copy.deepcopy(unet)
    channels_last_convolutions(hooked)
    x, t, states, grad = _unet_inputs(unet)
    outputs = []
    for model in (unet, hooked):
        out = model(x, t, encoder_hidden_states=states).sample
        out.backward(grad)
        outputs.append(out.detach())
    assert torch.equal(outputs[1], outputs[0])
    for (name, p), q in zip(unet.named_parameters(), hooked.parameters(), strict=True):
        assert p.grad is not None and torch.equal(q.grad, p.grad), name


def _compiled_conv_backward_layouts(unet: torch.nn.Module) -> tuple[int, list[tuple[bool, bool]]]:
    """Compile `unet` (AOTAutograd, no Inductor), run a training forward and backward: the
    Dynamo graphs traced, and per `convolution_backward` of the backward graph whether its output
    gradient and input have channels-last traced strides (what Inductor pins them to)."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func

    graphs: list[int] = []
    layouts: list[tuple[bool, bool]] = []

    def backward_graph(graph, _):
        for node in graph.graph.nodes:
            if node.target is torch.ops.aten.convolution_backward.default:
                grad, x = (arg.meta["val"] for arg in node.args[:2])
                layouts.append((grad.is_contiguous(memory_format=CL), x.is_contiguous(memory_format=CL)))
        return make_boxed_func(graph.forward)

    def record(gm, example_inputs):
        graphs.append(1)
        forward = lambda graph, _: make_boxed_func(graph.forward)  # noqa: E731
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward, bw_compiler=backward_graph)

    torch._dynamo.reset()
    x, t, states, grad = _unet_inputs(unet)
    torch.compile(unet, backend=record)(x, t, encoder_hidden_states=states).sample.backward(grad)
    return len(graphs), layouts


# Slow (a compiled trace of the tiny UNet's backward, ~25 s on 2 cores); the eager tests above
# cover the same hooks on every CI run.
@pytest.mark.slow
def test_channels_last_convolutions_hold_in_a_compiled_backward():
    """Traced, the hooks leave one graph (no graph break) whose convolution backwards all take
    channels-last arguments; without them some take NCHW inputs and sliced gradients."""
    unet = _tiny_unet_channels_last()
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    graphs, layouts = _compiled_conv_backward_layouts(unet)
    assert len(layouts) == convs and not all(g for g, _ in layouts) and not all(x for _, x in layouts)
    channels_last_convolutions(unet)
    graphs, layouts = _compiled_conv_backward_layouts(unet)
    assert graphs == 1 and len(layouts) == convs and all(g and x for g, x in layouts)


def _mode(setting=True, mode="auto", cuda=True, world_size=1, grad_accum=1, steps=1000):
    return resolve_compile(setting, mode, cuda=cuda, world_size=world_size, grad_accum=grad_accum, steps=steps)


def test_cuda_graph_modes_need_fresh_gradients_each_step(monkeypatch):
    assert _mode(mode="reduce-overhead") == "reduce-overhead"
    assert _mode(mode="reduce-overhead", grad_accum=2) == "default"
    assert _mode(mode="max-autotune", grad_accum=2) == "max-autotune-no-cudagraphs"
    assert _mode(mode="default", grad_accum=2) == "default"
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode in (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune"):
        step_begin(mode)
    assert len(marks) == 2


def test_auto_compile_resolves_per_device_and_worker_count(caplog):
    # CPU: never compiled, whatever the mode; tiny GPU runs stay eager too.
    assert _mode("auto", cuda=False) is None and _mode(True, cuda=False) is None
    assert _mode("auto", steps=50) is None and _mode(False) is None
    # One GPU: CUDA graphs over the compiled parts.
    assert _mode("auto") == "reduce-overhead"
    # N GPUs (DDP) or accumulation: the compiled step without CUDA graphs; an explicit CUDA-graph
    # mode under DDP falls back with its reason logged.
    assert _mode("auto", world_size=8) == "default" and _mode("auto", grad_accum=4) == "default"
    with caplog.at_level("WARNING", logger="pipeline.train.speed"):
        assert _mode(True, "reduce-overhead", world_size=2) == "default"
    assert "no CUDA graphs with DDP over several workers" in caplog.text
    assert _mode(True, "max-autotune-no-cudagraphs", world_size=2) == "max-autotune-no-cudagraphs"


def test_auto_precompute_pays_from_five_planned_epochs():
    def chosen(gpu=True, rows=1000, samples_per_step=32, steps=1000, setting="auto"):
        return resolve_precompute(setting, gpu=gpu, rows=rows, samples_per_step=samples_per_step, steps=steps)

    assert chosen()  # 32 epochs
    assert not chosen(steps=150)  # 4.8 epochs
    assert not chosen(gpu=False) and chosen(gpu=False, setting=True) and not chosen(setting=False)


def test_auto_precompute_reuses_inputs_already_precomputed(tmp_path):
    """A short job (a restart near the end, a second job) on a GPU trains from the precomputed
    inputs an earlier job left in train.storage_path: they cost nothing now, and the job then
    finds the compiled graphs of that earlier job instead of compiling the from-pixels step."""
    def chosen(gpu=True, setting="auto", cached=True):
        return resolve_precompute(setting, gpu=gpu, rows=1024, samples_per_step=32, steps=20, cached=cached)

    assert chosen() and not chosen(cached=False)  # 0.6 planned epochs
    assert not chosen(gpu=False) and not chosen(setting=False)  # the CPU and an explicit choice stay

    config = load_config(overrides=["train.steps=20", "train.batch_size=32", "train.gpu=true", f"train.storage_path={tmp_path}"])
    info = DatasetInfo(name="d", version="v0001", path="/d", digest="0" * 16, rows=1024, files=[], subjects=[], has_caption=False)
    assert not precompute_ready(info, config, str(tmp_path))
    assert resolve_speed_settings(config.train, info.rows, ready=lambda train: precompute_ready(info, config.model_copy(update={"train": train}), str(tmp_path))).precompute is False
    cache = tmp_path / Path(precompute_cache(info, config.model_copy(update={"train": config.train.model_copy(update={"composite": "stored"})}), str(tmp_path))[0]).name
    cache.mkdir()
    (cache / "_PRECOMPUTE_DONE.json").write_text("{}")
    train = resolve_speed_settings(config.train, info.rows, ready=lambda train: precompute_ready(info, config.model_copy(update={"train": train}), str(tmp_path)))
    assert train.precompute is True and train.composite == "stored"


def test_the_driver_resolves_every_auto_setting():
    def resolved(*overrides, rows=1024):
        train = load_config(overrides=["train.steps=1000", "train.batch_size=32", *overrides]).train
        train = resolve_speed_settings(train, rows)
        return train.compile, train.compile_mode, train.precompute

    assert resolved() == (False, "default", False)  # CPU: as before
    assert resolved("train.gpu=true") == (True, "reduce-overhead", True)
    assert resolved("train.gpu=true", "train.workers=4") == (True, "default", True)
    assert resolved("train.gpu=true", rows=10**6) == (True, "reduce-overhead", False)
    assert resolved("train.gpu=true", "train.compile=false", "train.precompute=false") == (False, "default", False)

    def composite(*overrides, rows=1024):
        train = load_config(overrides=["train.steps=1000", "train.batch_size=32", *overrides]).train
        train = resolve_speed_settings(train, rows, has_cutout=True)
        return train.composite, train.precompute

    # Rows with cutouts: online composites, their targets precomputed on GPUs from 5 planned epochs.
    assert composite("train.gpu=true") == ("online", True)
    assert composite("train.gpu=true", rows=10**6) == ("online", False)
    assert composite() == ("online", False)  # CPU
    assert composite("train.precompute=true") == ("stored", True)  # the full precompute is faster still


class _Shard:
    """Precomputed rows for the loop, the same on every call (like a Ray Data shard)."""

    def __init__(self, model: BlipDiffusion, rows: int = 4) -> None:
        rng = np.random.default_rng(0)
        size = model.qformer.image_size
        with torch.no_grad():
            features = model.qformer.image_features(
                torch.from_numpy(rng.standard_normal((rows, 3, size, size), dtype=np.float32))
            )
        self.batch = {
            CATEGORY: np.array(["dog", "teddy bear"] * (rows // 2), dtype=object),
            CAPTION: np.array([""] * rows, dtype=object),
            LATENT_PARAMS: rng.standard_normal((rows, 8, 8, 8), dtype=np.float32),
            IMAGE_FEATURES: features.numpy().astype(np.float16),
        }

    def iter_torch_batches(self, *, batch_size, collate_fn, **_):
        for start in range(0, len(self.batch[CATEGORY]) - batch_size + 1, batch_size):
            yield collate_fn({k: v[start : start + batch_size] for k, v in self.batch.items()})


def _train(tmp_path, name: str, overrides: list[str], monkeypatch, **loop_config) -> tuple[list[float], dict[str, int]]:
    """The loop itself (one local worker) for 3 steps on precomputed rows: its losses and ops.
    `loop_config`: more of the loop's settings (job_start, marks)."""
    config = load_config(
        overrides=[
            "profile=tiny",
            "tracking.enabled=false",
            "train.steps=3",
            "train.batch_size=2",
            "train.warmup_steps=0",
            "train.lr=1e-3",
            "train.drop_subject_prob=0.5",
            *overrides,
        ]
    )
    losses: list[float] = []

    class Losses(Hook):
        def after_loss(self, state, loss):
            losses.append(loss.item())

    monkeypatch.setattr(loop, "build_hooks", lambda *a: [*hooks.build_hooks(*a), Losses()])
    run = RunInfo(
        run_name=name,
        run_folder=str(tmp_path / name),
        tracking_uri=None,
        mlflow_run_id=None,
        dataset={"precomputed": True},
    )
    shard = _Shard(BlipDiffusion.from_pretrained(config.model_path("blip_diffusion")))
    with (
        dist.local_run(dist.LocalRun(shard=shard, run_folder=tmp_path / name, device=torch.device("cpu"))),
        _Ops() as ops,
    ):
        loop.train_loop({"config": config.model_dump(mode="json"), "run": asdict(run), **loop_config})
    return losses, ops.counts


def test_training_with_the_speed_settings_gives_the_same_losses(tmp_path, monkeypatch):
    """The UNet's attention on the math kernel (and a CUDA-graph compile mode, which the CPU
    loop does not compile for) trains like PyTorch's choice, and the loop does apply it."""
    base, base_ops = _train(tmp_path, "auto", [], monkeypatch)
    fast, fast_ops = _train(
        tmp_path, "math", ["train.unet_sdpa_backend=math", "train.compile_mode=reduce-overhead"], monkeypatch
    )
    assert len(base) == 3 and base[0] != base[-1]
    np.testing.assert_allclose(fast, base, rtol=1e-4)
    unet = BlipDiffusion.from_pretrained(TINY).unet
    layers = sum(isinstance(m, Attention) for m in unet.modules())
    # Every UNet attention call of the 3 steps moved from the flash kernel to the math one.
    assert base_ops[CPU_FLASH] - fast_ops.get(CPU_FLASH, 0) == 3 * layers


def test_a_resumed_job_compiles_with_the_cache_beside_its_checkpoints(tmp_path, monkeypatch):
    """Every attempt of a run (and every run in the same storage path) points Inductor's and
    Triton's caches at <storage_path>/compile-cache before it compiles: checked on the CPU with
    aot_eager, which runs the loop's compile path without Inductor."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    seen: list[tuple[str, str]] = []

    def compile_on_cpu(model, mode="default"):
        seen.append((os.environ["TORCHINDUCTOR_CACHE_DIR"], mode))
        compile_model(model, ("qformer",), mode=mode, backend="aot_eager")

    monkeypatch.setattr(loop, "compile_model", compile_on_cpu)
    monkeypatch.setattr(loop, "resolve_compile", lambda *a, **k: "default")  # as on a GPU
    first, _ = _train(tmp_path, "cached", [], monkeypatch)
    assert (tmp_path / "cached" / "step-0000003").is_dir()
    resumed, _ = _train(tmp_path, "cached", ["train.steps=5"], monkeypatch)
    assert len(first) == 3 and len(resumed) == 2  # the second attempt resumed at step 3
    cache = str(tmp_path / "compile-cache")
    assert seen == [(cache, "default"), (cache, "default")]
    assert os.environ["TRITON_CACHE_DIR"] == f"{cache}/triton" and (tmp_path / "compile-cache").is_dir()


# Run in a fresh process: Inductor reads its cache folder from the environment, and Dynamo's
# counters and in-memory caches must start empty.
_WARM_COMPILE = """
import json, sys
import torch
from torch import nn
from torch._dynamo.utils import counters
from pipeline.train.speed import compile_model, point_compile_cache

point_compile_cache(sys.argv[1])


class Unet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))


def step():
    holder = nn.Module()
    holder.unet = Unet()
    compile_model(holder, parts=("unet",), mode="default")
    holder.unet(torch.ones(2, 4, 16, 16)).sum().backward()


step()
torch._dynamo.reset()  # a second job: its graphs come from the cache folder
counters.clear()
step()
print(json.dumps(dict(counters["aot_autograd"])))
"""


def test_a_warm_compile_cache_holds_the_channels_last_unet_whole(tmp_path):
    """The channels-last hooks' autograd.Function made AOTAutograd bypass its cache for the
    UNet, so a warm-cache job traced and partitioned the UNet's forward and backward again
    (only Inductor's code came from the cache). A second compile in the same cache folder
    finds the whole compiled UNet (Inductor backend, on the CPU)."""
    done = subprocess.run(
        [sys.executable, "-c", _WARM_COMPILE, str(tmp_path / "compile-cache")], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    second = json.loads(done.stdout.strip().splitlines()[-1])
    assert second.get("autograd_cache_hit") == second["total"] and "autograd_cache_bypass" not in second, second
