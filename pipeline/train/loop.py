"""The training loop: one function, the same on every worker, read top to bottom.

shard -> noise the target latents -> predict the noise -> MSE (min-SNR weighted with
train.snr_gamma) -> backward -> clip -> step -> EMA -> hooks -> checkpoint. What trains, what is saved and the prompt text come from the method
(pipeline/train/methods.py); side jobs are hooks (hooks.py); everything Ray Train does for us
is behind pipeline/train/dist.py. `trainer.py` starts this function on N workers.
"""

from __future__ import annotations

import logging
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from pipeline.config import Config
from pipeline.train import IMPORT_STARTED, dist
from pipeline.train.arraycache import ArrayStream
from pipeline.train.data import FeedCollate, OnlineFeed, epoch_at_step
from pipeline.train.ema import EMA, EMA_FOLDER
from pipeline.train.hooks import RunInfo, StartupTimes, TrainState, build_hooks
from pipeline.train.losses import (
    add_noise,
    diffusion_target,
    min_snr_weights,
    offset_noise,
    sample_latents,
    sample_timesteps,
    subject_drop_mask,
    warmup_factor,
)
from pipeline.train.memory import build_optimizer, early_out_of_memory_is_final, enable_gradient_checkpointing
from pipeline.train.methods import get_method
from pipeline.train.speed import (
    GraphedUNet,
    compile_model,
    resolve_compile,
    set_unet_attention,
    step_begin,
    use_compile_cache,
    use_cuda_graphs,
)
from stages.records import CATEGORY
from stages.train_inputs import CAPTION, IMAGE_FEATURES, LATENT_PARAMS, PIXEL_VALUES, TARGET, latent_params

log = logging.getLogger(__name__)

CPU = torch.device("cpu")

TRAIN_STATE = "train_state.pt"  # optimizer, LR schedule and step, beside the method's files
PROGRESS = dist.PROGRESS  # {"step": N, "files": ...}, written last (dist.write_progress)


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train worker function. loop_config: {"config": resolved Config as JSON, "run": RunInfo
    fields, "job_start": the driver's time.time() at the job's start (optional), "online":
    pipeline.train.data.online_settings with train.composite online (optional), "marks": the
    driver's startup phases, time.time() each (optional; hooks.STARTUP_PHASES)}."""
    _setup_worker_logging()
    # The startup's phases (hooks.STARTUP_PHASES), logged with the first step (hooks.StartupTimes).
    marks = {**loop_config.get("marks", {}), **_process_start(), "imports": IMPORT_STARTED, "worker": time.time()}
    config = Config.model_validate(loop_config["config"])
    run = RunInfo(**loop_config["run"])
    train = config.train
    device = dist.device()
    bf16 = train.mixed_precision == "bf16" or (train.mixed_precision == "auto" and device.type == "cuda")
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest conv algorithms once

    # Seeded before the model is built: new weights (LoRA's A matrices) start random, and the
    # same settings must give the same model on every run and cluster.
    torch.manual_seed(train.seed)
    # The model and the optimizer state: from the newest checkpoint when there is one (a restart
    # after a failure, or a rerun with the same run name), else from the base weights.
    online = loop_config.get("online")
    with dist.resume_folder(run.run_folder) as folder:
        resumed = read_train_state(folder) if folder is not None else None
        step = resumed["step"] if resumed is not None else 0
        # The feed opens before the model loads, and makes its first batches meanwhile: Ray Data
        # starts executing at the first request (the first batch came 23 s after it on 2 CPUs).
        # Online composites need the model's image processor, so their feed opens after it.
        batches = None if online else _open_batches(loop_config, run, train, device, step, marks)
        method = get_method(train.method).load(config, folder, device)
    if batches is None:
        batches = _open_batches(loop_config, run, train, device, step, marks, method.model.image_processor)
    params = method.trainable_parameters()
    set_unet_attention(method.model.unet, train.unet_sdpa_backend)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(method.model.unet, method.model.text_encoder)
    # The torch.compile mode in use (None: eager); "auto" settings resolve here when the driver
    # did not resolve them (fine-tuning).
    compile_mode = resolve_compile(
        train.compile, train.compile_mode, cuda=device.type == "cuda", world_size=dist.world_size(),
        grad_accum=train.grad_accum, steps=train.steps,
    )
    if compile_mode is not None:
        use_compile_cache(run.run_folder.rsplit("/", 1)[0])
        compile_model(method.model, mode=compile_mode)
    graphs = use_cuda_graphs(
        train.cuda_graphs, device, dist.world_size(), train.grad_accum, compile_mode is not None, train.gradient_checkpointing,
        train.batch_size,
    )
    if graphs:
        method.graphed_unet = GraphedUNet(method.model.unet)
    model = dist.prepare(method, find_unused_parameters=train.drop_subject_prob > 0)
    marks["model"] = time.time()
    optimizer = build_optimizer(params, train, device)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_factor, warmup_steps=train.warmup_steps))
    # The method samples with the averaged weights when there are some (Method.sample).
    method.ema = ema = EMA(params, train.ema_decay) if train.ema_decay is not None else None
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        if ema is not None and "ema" in resumed:  # else the average starts from the resumed weights
            ema.load_state_dict(resumed["ema"])
        log.info("resuming at step %d", step)
    # Noise per worker, and new noise after a restart rather than a replay of the first attempt's.
    torch.manual_seed(train.seed + 1_000_003 * dist.rank() + step)

    noise_schedule = DDPMScheduler.from_config(method.model.scheduler.config)
    alphas_cumprod = noise_schedule.alphas_cumprod.to(device)
    prediction_type = noise_schedule.config.prediction_type
    num_timesteps = noise_schedule.config.num_train_timesteps
    scaling_factor = method.model.vae.config.scaling_factor
    precomputed = run.dataset.get("precomputed", False)

    state = TrainState(
        method=method,
        batches=batches,
        step=step,
        max_steps=train.steps,
        start_step=step,
        samples_per_step=train.batch_size * train.grad_accum * dist.world_size(),
    )
    job_start = loop_config.get("job_start")
    startup = StartupTimes(job_start, marks, device, run.dataset.get("precompute")) if job_start is not None else None
    hooks = build_hooks(config, run, device, startup)
    for hook in hooks:
        hook.on_start(state)
    marks["hooks"] = time.time()
    model.train()

    # An out-of-memory error at the attempt's start is the settings' (the batch), not bad luck:
    # the run ends at once, naming them, instead of being restarted to fail the same way.
    batch_key = "train.batch_size" if train.method == "pretrain" else "finetune.batch_size"
    with early_out_of_memory_is_final(state, batch_key, train.batch_size):
        while state.step < train.steps and not state.stop:  # a hook may stop early (finetune.patience)
            step_begin(compile_mode)
            for micro in range(train.grad_accum):
                batch = next(batches)
                categories = batch[CATEGORY]
                prompts = method.build_prompts(categories, batch[CAPTION])
                with dist.sync_gradients(model, sync=micro == train.grad_accum - 1):
                    # No autocast weight cache under CUDA graphs: the graphs would keep freed copies.
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphs):
                        if precomputed:  # VAE posterior made once, in Ray Data
                            posterior = batch[LATENT_PARAMS].to(device, non_blocking=True)
                            # The ViT features too, except for online composites: their pixels are
                            # new each epoch, and the Q-Former runs its ViT on 4-D pixels.
                            subject = batch[IMAGE_FEATURES if IMAGE_FEATURES in batch else PIXEL_VALUES].to(device, non_blocking=True)
                        else:
                            posterior = latent_params(method.model.vae, batch[TARGET].to(device, non_blocking=True))
                            subject = batch[PIXEL_VALUES].to(device, non_blocking=True)
                        latents = sample_latents(posterior, scaling_factor)  # (B, C, h, w) float32
                        if compile_mode is not None:
                            latents = latents.contiguous(memory_format=torch.channels_last)
                        noise = offset_noise(torch.randn_like(latents), train.noise_offset)
                        timesteps = sample_timesteps(latents.shape[0], num_timesteps, device)
                        noisy = add_noise(latents, noise, timesteps, alphas_cumprod)
                        target = diffusion_target(latents, noise, timesteps, alphas_cumprod, prediction_type)
                        weights = None if train.snr_gamma is None else min_snr_weights(alphas_cumprod, timesteps, train.snr_gamma, prediction_type)
                        drop = subject_drop_mask(latents.shape[0], train.drop_subject_prob, CPU)  # indexes on the host
                        prediction = model(subject, categories, prompts, noisy, timesteps, drop)
                        loss = method.loss(prediction, target, weights)
                    for hook in hooks:
                        hook.after_loss(state, loss)
                    (loss / train.grad_accum).backward()

            if train.max_grad_norm > 0:
                state.grad_norm = torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
            state.lr = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            state.step += 1
            for hook in hooks:
                hook.after_step(state)

            if state.step % train.checkpoint_every == 0 or state.step == train.steps:
                name = f"step-{state.step:07d}"
                with tempfile.TemporaryDirectory(prefix="subjectforge-ckpt-") as tmp:
                    folder = Path(tmp) if dist.is_main_process() else None
                    if folder is not None:
                        _save_checkpoint(folder, method, optimizer, schedule, state.step, ema)
                    dist.report({"step": state.step, **(state.stats or {})}, folder, name)
                for hook in hooks:
                    hook.on_checkpoint(state, name)

    for hook in hooks:
        hook.on_end(state)
    batches.close()


def _open_batches(
    loop_config: dict[str, Any], run: RunInfo, train: Any, device: torch.device, step: int, marks: dict[str, float],
    processor: Any = None,
) -> ArrayStream | dist.BatchStream:
    """This worker's batches from optimizer step `step` on, made ahead from now on: the
    memory-mapped precomputed arrays, or its Ray Data shard (batches made in Ray Data's threads,
    into page-locked memory on a GPU; the shuffle seeded like the noise, so the same settings give
    the same order). Online composites are made there too with `processor` (the model's), for
    the epoch a resumed run is in, so it sees what it would have seen. Marks "feed"."""
    pin = device.type == "cuda"
    if run.dataset.get("array_cache"):  # precomputed inputs, memory-mapped: no Ray Data in the way
        batches: ArrayStream | dist.BatchStream = ArrayStream(
            run.dataset["array_cache"], train.batch_size, rank=dist.rank(), world_size=dist.world_size(), seed=train.seed,
            consumed=step * train.grad_accum, pin=pin,
        )  # fmt: skip
    else:
        online = loop_config.get("online")
        feed = FeedCollate(run.dataset.get("tensor_layout"), pin=pin, online=OnlineFeed.build(online, processor, device))
        first_epoch = 0 if online is None else epoch_at_step(
            step, rows=online["rows"], passes=online["passes"], workers=dist.world_size(), batch_size=train.batch_size,
            grad_accum=train.grad_accum,
        )  # fmt: skip
        batches = dist.BatchStream(
            train.batch_size, train.shuffle_buffer, feed, prefetch=4, seed=train.seed + 1_000_003 * dist.rank() + step,
            first_epoch=first_epoch,
        )  # fmt: skip
    marks["feed"] = time.time()
    return batches


def _save_checkpoint(folder: Path, method: Any, optimizer: Any, schedule: Any, step: int, ema: EMA | None = None) -> None:
    """The method's files (the model) plus what resuming needs: optimizer, schedule, step; with
    an EMA, the method's files of the averaged weights in EMA_FOLDER and the average itself."""
    method.save(folder)
    state = {"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    if ema is not None:
        with ema.applied():
            method.save(folder / EMA_FOLDER)
        state["ema"] = ema.state_dict()
    torch.save(state, folder / TRAIN_STATE)
    dist.write_progress(folder, step)


def read_train_state(folder: Path) -> dict[str, Any]:
    """The optimizer, schedule and step `_save_checkpoint` wrote. Tensors and plain containers
    only (weights_only): a checkpoint in shared storage must not be able to run code here."""
    return torch.load(folder / TRAIN_STATE, map_location="cpu", weights_only=True)


def _process_start() -> dict[str, float]:
    """{"process": time.time() when this worker's process started} (Ray Train's actor: the time
    from it to the loop's start is Ray's setup and the imports), or {} without psutil."""
    try:
        import psutil
    except ImportError:
        return {}
    return {"process": psutil.Process().create_time()}


def _setup_worker_logging() -> None:
    """Ray workers start with the root logger at WARNING; show this package's INFO lines."""
    package = logging.getLogger("pipeline")
    if not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
        package.setLevel(logging.INFO)
        package.propagate = False
