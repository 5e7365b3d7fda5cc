"""Time BLIP-Diffusion generation against diffusers' StableDiffusionPipeline on one GPU.

Both run 512x512, 50 PNDM steps, classifier-free guidance 7.5, with real-sized random weights:
the SD 1.5 UNet and VAE (shared by both pipelines, so the comparison is like for like), CLIP
ViT-L text encoders, and for BLIP-Diffusion the BLIP-2 CLIP ViT-L/14 image encoder (23 layers)
and BERT-base Q-Former. Tokenizers are the tiny checkpoint's (ids only need to be in range).
Each timing is one `generate` call, subject encoding from one photo included, after a warm-up
call; times are wall clock with the GPU synchronised, in seconds per image.

    python benchmarks/bench_generate.py --out results.json          # on the GPU machine
    python benchmarks/bench_generate.py --tiny --steps 2 --size 64   # CPU smoke test
    python benchmarks/bench_generate.py --control --out control.json  # ControlNet cost (target <= 1.35x)
    python benchmarks/bench_generate.py --edit --out edit.json  # real-photo edit cost (target <= 2.5x)
    python benchmarks/bench_generate.py --slots --out slots.json  # what the server's LoRA slots cost

Modes run in order until --budget seconds are spent: eager (fp16, bf16, 4 images per call),
the SD pipeline eager, then torch.compile of the UNet and VAE decoder with CUDA graphs
("reduce-overhead") and channels-last, ours then the SD pipeline with the same compiled UNet.
With --control, the modes are ours plain and ours with a canny ControlNet (an SD 1.5-sized
ControlNet copied from the random UNet), eager then compiled alike, and `control_ratio` is
ControlNet time over plain time per mode. The ControlNet embeds the map once per generation and
runs the rest of itself every step (pipeline/model/control.py); compiled, each step runs the
ControlNet on a second CUDA stream beside the UNet's encoder half, captured as one CUDA graph
(`compile_for_inference(control=True)`, pipeline/model/control_step.py), and its same-run
baseline is the ControlNet and UNet as one graph on one stream ("compiled one graph"), with the
largest difference between the two images (`split_vs_one_graph_max_abs`).
With --edit, the modes are one generation and one real-photo edit (VAE encoding, DDIM inversion
and the attention-controlled two-row generation, pipeline/model/editing.py) of a 512 px photo,
eager then both compiled the same way (--compile-mode), and `edit_ratio` is edit time over
generation time per mode.
With --slots, the modes are compiled generation (CUDA graphs) of 1 and 4 images, then the same
with the server's LoRA slots in the UNet (`serve.max_lora_adapters` slots of `serve.max_lora_rank`,
every row on the zero base slot, as a zero-shot request draws) adding their per-row products,
then with the slot merged into the weights (serve.lora_merge, the server's mode for rows of one
slot), then 4 images of 4 LoRA subjects (random weights of `serve.max_lora_rank`) each on its
own slot merged into its rows' weights (serve.lora_merge's mode for rows of several slots; two
sets of subjects taking turns, so every call merges its rows again, as batches of ever new
subjects do), and `slot_ratio` is each over without: the price a served image pays for LoRA
subjects never recompiling, with per-row products, merged and per-row merged.
--profile (with --control or --slots) adds a torch.profiler table of each compiled mode's GPU
kernels for one generation: where a mode's extra time goes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import Blip2QFormerConfig, Blip2VisionConfig, CLIPTextConfig, CLIPTextModel

from pipeline.model import BlipDiffusion, SubjectImageProcessor
from pipeline.model.control import Control, make_control_map, prepare_control_image
from pipeline.model.control_step import ControlledStep
from pipeline.model.make_tiny import sd_scheduler
from pipeline.model.qformer import SubjectQFormer
from pipeline.model.text_encoder import ContextCLIPTextModel
from pipeline.model.tokenizers import load_clip_tokenizer, load_qformer_tokenizer

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "pipeline" / "assets" / "tiny-blipdiffusion"
PROMPT = "on the beach"

log = logging.getLogger("bench_generate")


def real_configs() -> tuple[dict, dict]:
    """Q-Former (Blip2Config layout) and text-encoder configs at the released sizes."""
    vision = Blip2VisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
        image_size=224, patch_size=14, hidden_act="quick_gelu", qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=30523, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, cross_attention_frequency=1, encoder_hidden_size=1024,
    )
    qformer_raw = {"num_query_tokens": 16, "vision_config": vision.to_dict(), "qformer_config": qformer.to_dict()}
    text = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    )
    return qformer_raw, text.to_dict()


def build_real(device: torch.device, dtype: torch.dtype) -> tuple[BlipDiffusion, StableDiffusionPipeline]:
    qformer_raw, text_raw = real_configs()
    with torch.device(device):  # random init straight on the GPU
        qformer = SubjectQFormer(qformer_raw)
        text_encoder = ContextCLIPTextModel(text_raw)
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # SD 1.5 defaults otherwise
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
        )
        clip_text = CLIPTextModel(CLIPTextConfig.from_dict(text_raw))
    tokenizer = load_clip_tokenizer(TINY / "tokenizer", 49408)
    model = BlipDiffusion(
        qformer=qformer, text_encoder=text_encoder, unet=unet, vae=vae, scheduler=sd_scheduler(),
        tokenizer=tokenizer, qformer_tokenizer=load_qformer_tokenizer(TINY, None, 30523),
        image_processor=SubjectImageProcessor(),
    ).to(device=device, dtype=dtype).eval()
    sd = StableDiffusionPipeline(
        vae=vae, text_encoder=clip_text.to(device=device, dtype=dtype), tokenizer=tokenizer, unet=unet,
        scheduler=sd_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return model, sd


def build_tiny(device: torch.device, dtype: torch.dtype) -> tuple[BlipDiffusion, StableDiffusionPipeline]:
    model = BlipDiffusion.from_pretrained(TINY, dtype=dtype, device=device)
    clip_text = CLIPTextModel(model.text_encoder.config).to(device=device, dtype=dtype)
    sd = StableDiffusionPipeline(
        vae=model.vae, text_encoder=clip_text, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=PNDMScheduler.from_config(model.scheduler.config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return model, sd


def best_per_image(results: dict) -> dict[str, float]:
    """Each run's best seconds per image, by run name (runs that failed left out)."""
    return {run["name"]: run["best_s_per_image"] for run in results["runs"] if "error" not in run}


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall-clock seconds of `fn()` per repeat, after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return out


def bench_control(args, model: BlipDiffusion, photo: Image.Image, ours, record, results: dict, t0: float) -> int:
    """Plain against ControlNet generation, eager then compiled (both compiled the same way)."""
    from diffusers import ControlNetModel

    device, dtype = model.device, model.dtype
    if args.tiny:
        controlnet = ControlNetModel.from_pretrained(str(REPO / "pipeline" / "assets" / "tiny-controlnet"))
    else:
        controlnet = ControlNetModel.from_unet(model.unet)
    controlnet = controlnet.to(device=device, dtype=dtype).eval()
    image = prepare_control_image(make_control_map("canny", photo, args.size, args.size), model.image_processor, args.size, args.size)
    control = Control(controlnet, image, 1.0)
    record("ours eager, 1 image", ours(1), 1)
    record("ours+controlnet eager, 1 image", ours(1, control), 1)
    if time.perf_counter() - t0 < args.budget:
        mode = "reduce-overhead" if device.type == "cuda" else None
        model.compile_for_inference(mode=mode, control=True)
        record("ours compiled, 1 image", ours(1), 1)
        record("ours+controlnet compiled, 1 image", ours(1, control), 1)
        if args.control_end < 1.0:  # the guidance window: steps after it run the plain UNet graph
            windowed = Control(controlnet, image, 1.0, end=args.control_end)
            record(f"ours+controlnet compiled, window 0-{args.control_end:g}, 1 image", ours(1, windowed), 1)
        if args.profile:
            results["profile"] = {"plain": kernel_profile(ours(1), device), "controlnet": kernel_profile(ours(1, control), device)}
        if isinstance(model._controlled_noise, ControlledStep) and time.perf_counter() - t0 < args.budget:
            # The baseline of the split step, in the same process: the ControlNet and UNet as one
            # graph on one stream (what compile_for_inference makes for a UNet it cannot split).
            try:
                split = ours(1, control)()
                model._controlled_noise = torch.compile(BlipDiffusion._controlled_noise.__get__(model), mode=mode)
                record("ours+controlnet compiled one graph, 1 image", ours(1, control), 1)
                one_graph = ours(1, control)()
                results["split_vs_one_graph_max_abs"] = round(float((split.float() - one_graph.float()).abs().max()), 5)
                if args.profile:
                    results["profile"]["controlnet_one_graph"] = kernel_profile(ours(1, control), device)
            except Exception as exc:  # the timings above still count
                log.exception("the one-graph baseline failed")
                results["one_graph_error"] = f"{type(exc).__name__}: {exc}"[:500]
    best = best_per_image(results)
    results["control_ratio"] = {
        mode: round(best[f"ours+controlnet {mode}, 1 image"] / best[f"ours {mode.removesuffix(' one graph')}, 1 image"], 3)
        for mode in ("eager", "compiled", "compiled one graph")
        if f"ours+controlnet {mode}, 1 image" in best and f"ours {mode.removesuffix(' one graph')}, 1 image" in best
    }
    for name, seconds in best.items():
        if ", window " in name and "ours compiled, 1 image" in best:
            results["control_ratio"][name.removeprefix("ours+controlnet compiled, ").removesuffix(", 1 image")] = round(
                seconds / best["ours compiled, 1 image"], 3)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def bench_edit(args, model: BlipDiffusion, photo: Image.Image, ours, record, results: dict, t0: float) -> int:
    """One generation against one real-photo edit (inversion + controlled generation), the same
    steps, size and guidance, eager then compiled alike."""
    from pipeline.model.editing import edit

    def photo_edit():
        return edit(
            model, f"a dog {PROMPT}", "dog", subject_images=[photo], category="cat", image=photo,
            steps=args.steps, height=args.size, width=args.size, seed=0, progress=False,
        )

    results["settings"]["edit"] = {"prompt": f"a dog {PROMPT}", "replace": "dog", "compile_mode": args.compile_mode}
    record("ours eager, 1 image", ours(1), 1)
    record("edit eager, 1 image", photo_edit, 1)
    if time.perf_counter() - t0 < args.budget:
        mode = None if args.compile_mode == "default" else args.compile_mode
        model.compile_for_inference(mode=mode)
        record("ours compiled, 1 image", ours(1), 1)
        record("edit compiled, 1 image", photo_edit, 1)
    best = best_per_image(results)
    results["edit_ratio"] = {
        mode: round(best[f"edit {mode}, 1 image"] / best[f"ours {mode}, 1 image"], 3)
        for mode in ("eager", "compiled")
        if f"edit {mode}, 1 image" in best and f"ours {mode}, 1 image" in best
    }
    results["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def kernel_profile(fn, device: torch.device, top: int = 15) -> dict:
    """One call of `fn` under torch.profiler: GPU busy seconds against wall seconds (the gap is
    the GPU waiting for the host) and the `top` kernels by GPU time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fn()  # warm: nothing compiles or captures inside the profile
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    key = "self_device_time_total" if events and hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    busy = sum(getattr(e, key) for e in events) / 1e6
    return {
        "wall_s": round(wall, 4),
        "gpu_busy_s": round(busy, 4),
        "kernels": [{"name": e.key[:120], "calls": e.count, "gpu_s": round(getattr(e, key) / 1e6, 4)} for e in events[:top]],
    }


def bench_slots(args, model: BlipDiffusion, ours, record, results: dict) -> int:
    """Compiled generation without, then with, the server's LoRA slots (every row on slot 0):
    their per-row products, then the slot merged; then rows of several loaded slots, each row's
    slot merged into its row weights."""
    from pipeline.config import load_config
    from pipeline.serving.lora_slots import LoraSlots

    serve = load_config().serve
    mode = "reduce-overhead" if model.device.type == "cuda" else None
    model.compile_for_inference(mode=mode)
    record("ours compiled, 1 image", ours(1), 1)
    record("ours compiled, 4 images/call", ours(4), 4)
    if args.profile:
        results["profile"] = {"plain": kernel_profile(ours(1), model.device)}
    # Installing the slots swaps the UNet's attention Linears: Dynamo recompiles at the next call.
    slots = LoraSlots(model.unet, serve.max_lora_adapters, serve.max_lora_rank, merge=True)
    results["settings"]["slots"] = {"slots": serve.max_lora_adapters, "rank": serve.max_lora_rank, "layers": len(slots.layers)}

    def with_slots(n: int, merge: bool = False):
        def call():
            with slots.use([0] * 2 * n, merge=merge):  # [uncond; cond] rows, all on the base slot
                return ours(n)()
        return call

    record("ours compiled + LoRA slots, 1 image", with_slots(1), 1)
    record("ours compiled + LoRA slots, 4 images/call", with_slots(4), 4)
    record("ours compiled + LoRA slots merged, 1 image", with_slots(1, merge=True), 1)
    record("ours compiled + LoRA slots merged, 4 images/call", with_slots(4, merge=True), 4)
    mixed = mixed_subjects(slots, serve.max_lora_rank, 4, ours(4))
    record("ours compiled + LoRA slots per-row merged, 4 images/call", mixed, 4)
    if args.profile:
        results["profile"]["slots"] = kernel_profile(with_slots(1), model.device)
        results["profile"]["slots merged"] = kernel_profile(with_slots(1, merge=True), model.device)
        results["profile"]["slots per-row merged, 4 images"] = kernel_profile(mixed, model.device)
    best = best_per_image(results)
    results["slot_ratio"] = {
        f"{mode}, {n}": round(best[f"ours compiled + {mode}, {n}"] / best[f"ours compiled, {n}"], 3)
        for mode in ("LoRA slots", "LoRA slots merged", "LoRA slots per-row merged")
        for n in ("1 image", "4 images/call")
        if f"ours compiled + {mode}, {n}" in best and f"ours compiled, {n}" in best
    }
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


def mixed_subjects(slots, rank: int, n: int, generate):
    """`generate` (a call of `n` images) with each image of its own LoRA subject (random weights of `rank`,
    loaded into 2n slots) in the per-row merged mode; calls take turns between the first n
    subjects and the next n, so each call merges its rows again, as a server's mixed batches of
    ever new subjects do. The images are of random subjects: only their time counts."""
    generator = torch.Generator().manual_seed(0)

    def subject() -> int:
        weights = []
        for layer in slots.layers.values():
            weights.append((layer, True, torch.randn(rank, layer.in_features, generator=generator) / layer.in_features**0.5))
            weights.append((layer, False, torch.randn(layer.out_features, rank, generator=generator) * 0.01))
        return slots.load(weights, 1.0)

    turns = itertools.cycle([[subject() for _ in range(n)] for _ in range(2)])

    def call():
        images = next(turns)
        with slots.use(images * 2, merge=True):  # [uncond; cond] rows, each image on its own slot
            return generate()
    return call


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint instead of real sizes")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=420.0, help="stop starting new modes after this many s")
    parser.add_argument("--out", type=Path, default=Path("bench_generate.json"))
    parser.add_argument("--control", action="store_true", help="time ControlNet generation against plain")
    parser.add_argument("--edit", action="store_true", help="time a real-photo edit (inversion + generation) against one generation")
    parser.add_argument("--control-end", type=float, default=1.0, help="--control: also time the compiled ControlNet with this guidance window end")
    parser.add_argument("--slots", action="store_true", help="time compiled generation without and with the server's LoRA slots")
    parser.add_argument("--profile", action="store_true", help="--control/--slots: a kernel table of one generation per compiled mode")
    parser.add_argument("--compile-mode", default="default", help="--edit: torch.compile mode of both (default, reduce-overhead, ...)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: the tiny checkpoint, 2 steps, 64 px, 1 repeat")
    args = parser.parse_args()
    if args.smoke:  # every mode runs, however slow the CPU
        args.tiny, args.steps, args.size, args.repeats, args.budget = True, 2, 64, 1, float("inf")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 300, 3), dtype=np.uint8))
    results: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "settings": {"size": args.size, "steps": args.steps, "guidance_scale": 7.5, "scheduler": "PNDM", "tiny": args.tiny},
        "runs": [],
    }
    import diffusers
    import transformers

    results["versions"].update(diffusers=diffusers.__version__, transformers=transformers.__version__)
    build = build_tiny if args.tiny else build_real
    model, sd = build(device, torch.float16 if device.type == "cuda" else torch.float32)
    results["build_s"] = round(time.perf_counter() - t0, 1)

    def ours(n: int, control: Control | None = None):
        return lambda: model.generate(
            PROMPT, subject_images=[photo], category="dog", num_images=n, steps=args.steps,
            height=args.size, width=args.size, seed=0, output_type="pt", progress=False, control=control,
        )

    def theirs(n: int):
        return lambda: sd(
            f"a dog {PROMPT}", num_images_per_prompt=n, num_inference_steps=args.steps,
            height=args.size, width=args.size, guidance_scale=7.5, output_type="pt",
            generator=torch.Generator("cpu").manual_seed(0),
        )

    def record(name: str, fn, n: int) -> None:
        if time.perf_counter() - t0 > args.budget:
            log.info("skip %s: budget spent", name)
            return
        start = time.perf_counter()
        try:
            seconds = timed(fn, device, args.repeats)
        except Exception as exc:  # record the failure and go on: the modes after it still count
            log.exception("%s failed", name)
            results["runs"].append({"name": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            args.out.write_text(json.dumps(results, indent=2))
            return
        per_image = min(seconds) / n
        results["runs"].append({
            "name": name, "images_per_call": n, "seconds_per_call": [round(s, 4) for s in seconds],
            "best_s_per_image": round(per_image, 4), "mean_s_per_image": round(sum(seconds) / len(seconds) / n, 4),
            "wall_incl_warmup_s": round(time.perf_counter() - start, 1),
            "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        })
        log.info("%-40s %.3f s/image", name, per_image)
        args.out.write_text(json.dumps(results, indent=2))  # partial results survive a timeout

    is_cuda = device.type == "cuda"
    if args.control:
        return bench_control(args, model, photo, ours, record, results, t0)
    if args.edit:
        return bench_edit(args, model, photo, ours, record, results, t0)
    if args.slots:
        return bench_slots(args, model, ours, record, results)
    record("ours eager fp16, 1 image", ours(1), 1)
    record("sd-pipeline eager fp16, 1 image", theirs(1), 1)
    record("ours eager fp16, 4 images/call", ours(4), 4)
    record("sd-pipeline eager fp16, 4 images/call", theirs(4), 4)
    if is_cuda:
        model.to(dtype=torch.bfloat16)
        record("ours eager bf16, 1 image", ours(1), 1)
        model.to(dtype=torch.float16)
    # torch.compile with CUDA graphs: launch overhead, not FLOPs, bounds a 64x64-latent UNet.
    if time.perf_counter() - t0 < args.budget:
        model.compile_for_inference(mode="reduce-overhead" if is_cuda else None)
        record("ours compiled+cudagraphs fp16, 1 image", ours(1), 1)
        record("sd-pipeline compiled+cudagraphs fp16, 1 image", theirs(1), 1)
        record("ours compiled+cudagraphs fp16, 4 images/call", ours(4), 4)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
