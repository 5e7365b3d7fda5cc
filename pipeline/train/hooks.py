"""Side jobs of the training loop, one small object each (MosaicML's callbacks, in miniature).

The loop calls every hook at five points: `on_start`, `after_loss` (each micro-batch),
`after_step` (each optimizer step), `on_checkpoint` (after a checkpoint was reported) and
`on_end`. A hook overrides the one it needs. Hooks that log run only on rank 0 (`build_hooks`
decides), and only they call pipeline.tracking.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from pipeline import tracking
from pipeline.config import Config
from pipeline.evaluation.report import make_subject_grid
from pipeline.train import dist, speed, validation

log = logging.getLogger(__name__)


@dataclass
class RunInfo:
    """What the driver resolved for the workers (plain values, so Ray can ship it)."""

    run_name: str
    run_folder: str  # <storage_path>/<run_name>
    tracking_uri: str | None  # None: no MLflow
    mlflow_run_id: str | None
    dataset: dict[str, Any]  # name, version, digest, path, rows, precomputed
    samples: list[dict[str, Any]] = field(default_factory=list)  # subject_id, category, composite (bytes)
    validation: dict[str, Any] | None = None  # a fine-tune's validation.ValidationPlan fields; None = no validation


@dataclass
class TrainState:
    """What hooks see. `stats` is set by IntervalStats on logging steps and None otherwise."""

    method: Any  # the unwrapped Method
    batches: Any  # the dist.BatchStream the loop draws from (its wait_s)
    step: int  # optimizer steps done
    max_steps: int
    start_step: int  # the step this attempt started from (0, or the checkpoint it resumed)
    samples_per_step: int  # over all workers
    lr: float = 0.0
    grad_norm: torch.Tensor | None = None
    stats: dict[str, float] | None = None
    first_step_s: float | None = None  # the job's start to this attempt's first step done, s
    startup: dict[str, float] = field(default_factory=dict)  # phase -> s after the job's start (StartupTimes)
    # Set by a hook to end the run after this step (early stopping). Only rank 0's hooks may set
    # it, so only one-worker runs (fine-tunes) have such a hook.
    stop: bool = False


class Hook:
    def on_start(self, state: TrainState) -> None: ...

    def after_loss(self, state: TrainState, loss: torch.Tensor) -> None: ...

    def after_step(self, state: TrainState) -> None: ...

    def on_checkpoint(self, state: TrainState, name: str) -> None: ...

    def on_end(self, state: TrainState) -> None: ...


class NaNCatcher(Hook):
    """Stops the run at the first non-finite loss, before it reaches the weights.

    `every` > 1 checks every Nth micro-batch only: each check waits for the GPU to finish it.
    """

    def __init__(self, every: int = 1) -> None:
        self.every, self.calls = every, 0

    def after_loss(self, state: TrainState, loss: torch.Tensor) -> None:
        self.calls += 1
        if self.calls % self.every == 0 and not torch.isfinite(loss).item():
            raise FloatingPointError(f"loss is {loss.item()} at step {state.step + 1}")


# The startup's phases and their names in the first step's log line: the driver's
# (trainer.run_training), then the worker's (loop.train_loop, StartupTimes).
STARTUP_PHASES = {
    "checked": "checks",  # config, dataset and base model checked
    "ray": "Ray up",  # the cluster joined or started
    "data": "data",  # the Ray Data plan built; with precompute, the cache made or found
    "fit": "fit",  # Ray Train asked for the workers
    "process": "worker process",  # this worker's process started (Ray Train's actor)
    "imports": "imports",  # the worker began importing the loop's code (pipeline.train.IMPORT_STARTED)
    "worker": "loop",  # the loop entered: the imports done
    "feed": "feed open",  # the batch stream opened (it makes batches ahead from then on)
    "model": "model ready",  # loaded, on the device, wrapped (compilation happens in the first step)
    "hooks": "hooks",  # optimizer built, hooks started (MLflow calls)
    "batch": "first batch",  # the loop received its first batch
    "forward": "first forward",  # the first loss computed (a compile's forward graphs built)
}


class StartupTimes(Hook):
    """Where the job's start-up went: when the first step is done, one log line with each phase's
    time after the job's start (STARTUP_PHASES, from `marks`: time.time() of each phase the
    driver and the loop reached), the compile's share and its cache counts; the phases go into
    `state.startup` (IntervalStats reports them as startup_<phase>_s metrics) and the total into
    `state.first_step_s`. Waits once for the device at the first forward and the first step, so
    the times are the kernels', not their queueing's. Runs first among the hooks."""

    def __init__(self, job_start: float, marks: dict[str, float], device: torch.device, precompute: str | None = None) -> None:
        """marks: the loop's, which it fills until the first step; precompute: what the driver did
        for the precomputed inputs ("made", "reused" or None, DatasetInfo.precompute)."""
        self.job_start, self.marks, self.device, self.precompute = job_start, marks, device, precompute
        self.done = False
        # Compiles before this job in the same process (a reused worker, a test) are not its own.
        self.compile_since, self.caches_since = speed.compile_time_spent(), speed.compile_cache_counts()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # once per phase: the kernels are done, not only queued
        return time.time()

    def after_loss(self, state: TrainState, loss: torch.Tensor) -> None:
        if "forward" not in self.marks:
            self.marks["forward"] = self._now()

    def after_step(self, state: TrainState) -> None:
        if self.done:
            return
        self.done = True
        seconds = self._now() - self.job_start
        first_batch = getattr(state.batches, "first_batch_at", None)
        if first_batch is not None:
            self.marks.setdefault("batch", first_batch)
        # In the order they happened (the loop may open the feed before or after the model). A
        # phase before the job's start (a worker process Ray started earlier and reused, whose
        # imports were done by then) is named as such, not given a negative time or a metric.
        ordered = sorted((item for item in self.marks.items() if item[0] in STARTUP_PHASES), key=lambda item: item[1])
        earlier = [phase for phase, at in ordered if at < self.job_start]
        phases = {phase: at - self.job_start for phase, at in ordered if at >= self.job_start}
        state.first_step_s, state.startup = seconds, phases
        log.info("%s", self.describe(seconds, phases, earlier))

    def describe(self, seconds: float, phases: dict[str, float], earlier: list[str] = ()) -> str:
        """The log line: "first step done T s after the job started: checks 0.3, ..., first
        forward 80.1 s; compile 70.2 s (...); compile caches: {...}", the phases in time order,
        after those `earlier` than the job ("worker process before the job")."""
        parts = [f"{STARTUP_PHASES[phase]} before the job" for phase in earlier]
        for phase, at in phases.items():
            name = STARTUP_PHASES[phase]
            if phase == "data" and self.precompute is not None:
                name = f"data (precompute {self.precompute})"
            parts.append(f"{name} {at:.1f}")
        return (
            f"first step done {seconds:.1f} s after the job started: {', '.join(parts)} s; "
            f"{speed.describe_compile_time(self.compile_since)}; "
            f"compile caches: {speed.compile_cache_counts(self.caches_since) or 'unused'}"
        )


class IntervalStats(Hook):
    """Every `every` steps (and at the last): loss averaged over the interval and all workers,
    grad norm, samples/s, the share of the time spent waiting for data, and ETA into
    `state.stats`. Runs on every rank (one all-reduce)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.loss_sum: torch.Tensor | None = None
        self.count = 0
        self.since = time.perf_counter()
        self.since_step = 0
        self.since_wait = 0.0

    def on_start(self, state: TrainState) -> None:
        self.since, self.since_step, self.since_wait = time.perf_counter(), state.step, state.batches.wait_s

    def after_loss(self, state: TrainState, loss: torch.Tensor) -> None:
        detached = loss.detach().float()
        self.loss_sum = detached if self.loss_sum is None else self.loss_sum + detached
        self.count += 1

    def after_step(self, state: TrainState) -> None:
        state.stats = None
        if state.step % self.every and state.step != state.max_steps:
            return
        loss, wait = dist.mean_over_workers(
            torch.cat([self.loss_sum.reshape(1) / self.count, self.loss_sum.new_tensor([state.batches.wait_s - self.since_wait])])
        ).tolist()
        seconds = max(time.perf_counter() - self.since, 1e-9)
        steps = state.step - self.since_step
        state.stats = {
            "loss": loss,
            "lr": state.lr,
            "samples_per_s": state.samples_per_step * steps / seconds,
            "data_wait_share": min(wait / seconds, 1.0),
            "eta_s": seconds / max(steps, 1) * (state.max_steps - state.step),
        }
        if state.grad_norm is not None:
            state.stats["grad_norm"] = float(state.grad_norm)
        if state.first_step_s is not None:
            state.stats["time_to_first_step_s"] = state.first_step_s
            state.stats.update({f"startup_{phase}_s": seconds for phase, seconds in state.startup.items()})
        if torch.cuda.is_available() and dist.device().type == "cuda":
            state.stats["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.loss_sum, self.count = None, 0
        self.since, self.since_step, self.since_wait = time.perf_counter(), state.step, state.batches.wait_s


class ProgressLog(Hook):
    """The live line: step, loss, samples/s, ETA (rank 0)."""

    def after_step(self, state: TrainState) -> None:
        s = state.stats
        if s is None:
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(s["eta_s"])) if s["eta_s"] < 86400 else f"{s['eta_s'] / 86400:.1f}d"
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.1f samples/s  data wait %.0f%%  ETA %s",
            state.step, state.max_steps, s["loss"], s["lr"], s["samples_per_s"], 100 * s["data_wait_share"], eta,
        )


class MetricsLog(Hook):
    """MLflow metrics with step= on every logging step (rank 0), each step once.

    A restarted worker group resumes from the newest checkpoint, so the steps between it and the
    failure run again. MLflow can neither replace nor delete a logged point, and a second point
    at a step would make the history double back. So each attempt reads once, at its start, the
    last step the run has logged, and logs only the steps after it: a replayed step keeps the
    values its first run logged, and the history has one point per step.
    """

    KEY = "loss"  # IntervalStats reports it at every logging step

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        self.logged_through = -1

    def on_start(self, state: TrainState) -> None:
        self.logged_through = tracking.last_metric_step(self.run.tracking_uri, self.run.mlflow_run_id, self.KEY)
        if self.logged_through > state.step:
            log.info("MLflow already holds metrics up to step %d: replayed steps are not logged again", self.logged_through)

    def after_step(self, state: TrainState) -> None:
        if state.stats is not None and state.step > self.logged_through:
            tracking.log_metrics(self.run.tracking_uri, self.run.mlflow_run_id, state.stats, state.step)


class RunRecord(Hook):
    """The run's params (the resolved config) and its dataset as an MLflow input (rank 0)."""

    def __init__(self, run: RunInfo, config: Config) -> None:
        self.run, self.config = run, config

    def on_start(self, state: TrainState) -> None:
        uri, run_id = self.run.tracking_uri, self.run.mlflow_run_id
        tracking.log_params(uri, run_id, tracking.flatten(self.config.model_dump(mode="json")))
        tracking.log_dataset(uri, run_id, **self.run.dataset)


class SystemMetrics(Hook):
    """CPU, memory (and GPU where pynvml is installed) of rank 0's node, sampled by MLflow."""

    def __init__(self, run: RunInfo) -> None:
        self.run = run
        self.monitor: Any = None

    def on_start(self, state: TrainState) -> None:
        self.monitor = tracking.start_system_metrics(self.run.tracking_uri, self.run.mlflow_run_id)

    def on_end(self, state: TrainState) -> None:
        if self.monitor is not None:
            self.monitor.finish()


class SampleImages(Hook):
    """Every `every` steps and at the end: one generation per fixed subject, logged as an MLflow
    image (rank 0, the in-memory model; the other ranks wait at the next all-reduce)."""

    def __init__(self, run: RunInfo, config: Config) -> None:
        self.run, self.cfg = run, config.train.samples
        self.size = config.train.resolution
        self.subjects = [
            (s["subject_id"], s["category"], PIL.Image.open(io.BytesIO(s["composite"])).convert("RGB")) for s in run.samples
        ]

    def _log(self, state: TrainState) -> None:
        for subject_id, category, composite in self.subjects:
            image = state.method.sample(
                composite, category, self.cfg.prompt, steps=self.cfg.steps, guidance_scale=self.cfg.guidance_scale,
                height=self.size, width=self.size, seed=0,
            )
            tracking.log_image(self.run.tracking_uri, self.run.mlflow_run_id, image, f"samples/{subject_id}", state.step)

    def after_step(self, state: TrainState) -> None:
        if self.cfg.every and state.step % self.cfg.every == 0 and state.step != state.max_steps:
            self._log(state)

    def on_end(self, state: TrainState) -> None:
        if self.cfg.every and state.step > state.start_step:
            self._log(state)


class Validation(Hook):
    """A fine-tune's validation (pipeline/train/validation.py), at each checkpoint: the prompts
    drawn with fixed seeds and scored (DINO, CLIP-I, CLIP-T), a grid and the scores logged with
    step=, a record in the run folder; then checkpoints beyond `keep` are deleted, the best kept,
    and after `patience` validations without a new best the run stops. A resumed checkpoint that
    was never validated (the run died in between) is validated first."""

    def __init__(self, run: RunInfo, config: Config, device: torch.device) -> None:
        self.run, self.config, self.device = run, config, device
        self.plan = validation.ValidationPlan(**run.validation)
        self.records: list[dict[str, Any]] = []
        self.scorer: validation.Scorer | None = None
        self.photos: list[PIL.Image.Image] = []

    def on_start(self, state: TrainState) -> None:
        recorded = validation.read_records(self.run.run_folder)
        self.records = [r for r in recorded if r[validation.STEP] <= state.step]  # later ones are replayed
        if len(self.records) < len(recorded):
            validation.write_records(self.run.run_folder, self.records)
        if state.step > 0 and all(r[validation.STEP] != state.step for r in self.records):
            self._validate(state, checkpoint_name(state.step))
        else:
            self._check_patience(state)

    def on_checkpoint(self, state: TrainState, name: str) -> None:
        self._validate(state, name)

    def _validate(self, state: TrainState, name: str) -> None:
        if self.scorer is None:
            self.photos = validation.read_photos(self.plan.photos)
            self.scorer = validation.Scorer(self.config, self.photos, self.device)
        images = validation.draw_images(state.method, self.plan)
        scores = self.scorer.score(images, self.plan.prompts)
        self.records.append({validation.STEP: state.step, validation.CHECKPOINT: name, **scores})
        validation.write_records(self.run.run_folder, self.records)
        log.info("validation at step %d: DINO %.4f  CLIP-I %.4f  CLIP-T %.4f", state.step, scores["dino"], scores["clip_i"], scores["clip_t"])
        if self.run.tracking_uri is not None:
            uri, run_id = self.run.tracking_uri, self.run.mlflow_run_id
            tracking.log_metrics(uri, run_id, {f"validation/{k}": v for k, v in scores.items()}, state.step)
            grid = make_subject_grid(self.photos, [images], thumbnail=min(self.plan.size, 256))
            tracking.log_image(uri, run_id, grid, "validation", state.step)
        kept = validation.checkpoints_to_keep(self.records, self.plan.select, self.plan.keep, newest=name)
        deleted = validation.prune_checkpoints(self.run.run_folder, kept)
        if deleted:
            log.info("deleted checkpoints %s (kept %s)", ", ".join(deleted), ", ".join(sorted(kept)))
        self._check_patience(state)

    def _check_patience(self, state: TrainState) -> None:
        stale = validation.validations_since_best(self.records, self.plan.select)
        if self.plan.patience is not None and stale >= self.plan.patience:
            best = validation.rank_records(self.records, self.plan.select)[0][validation.STEP]
            log.info("early stop at step %d: %d validations since the best (step %d, finetune.select %s)", state.step, stale, best, self.plan.select)
            state.stop = True


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at `step` (<run_folder>/<name>)."""
    return f"step-{step:07d}"


class CheckpointLog(Hook):
    """Names the newest checkpoint in the log and as an MLflow tag (rank 0). Ray Train keeps the
    newest `train.keep_checkpoints` and deletes older ones (CheckpointConfig(num_to_keep))."""

    def __init__(self, run: RunInfo) -> None:
        self.run = run

    def on_checkpoint(self, state: TrainState, name: str) -> None:
        log.info("checkpoint %s/%s at step %d", self.run.run_folder, name, state.step)
        tracking.set_tag(self.run.tracking_uri, self.run.mlflow_run_id, "checkpoint.latest", name)


class StepLedger(Hook):
    """Appends one JSON line per optimizer step to <folder>/rank-<r>.jsonl (every rank): the
    audit trail that shows which steps each worker trained, across restarts."""

    def __init__(self, folder: str) -> None:
        self.path = Path(folder) / f"rank-{dist.rank()}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.pid = os.getpid()

    def after_step(self, state: TrainState) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": state.step, "pid": self.pid, "start_step": state.start_step}) + "\n")


class FaultInjection(Hook):
    """Test aid (`train.fail_at_step`): the last rank kills its own process right after step N,
    once per run (a marker file in the run folder says it happened), so Ray Train restarts the
    worker group from the newest checkpoint."""

    def __init__(self, step: int, run_folder: str) -> None:
        self.step = step
        self.marker = Path(run_folder) / f"fault-injected-at-step-{step}"

    def after_step(self, state: TrainState) -> None:
        if state.step == self.step and dist.rank() == dist.world_size() - 1 and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"pid {os.getpid()}\n")
            log.warning("fault injection: killing worker %d (pid %d) after step %d", dist.rank(), os.getpid(), state.step)
            os._exit(1)


def build_hooks(config: Config, run: RunInfo, device: torch.device, startup: StartupTimes | None = None) -> list[Hook]:
    """The hooks of this worker, in call order: the startup's times (first: the others' work is
    not start-up), checks, statistics, then what rank 0 logs."""
    train = config.train
    # On a GPU every check waits for the step to finish, so check at the logging interval there.
    hooks: list[Hook] = [NaNCatcher(every=1 if device.type == "cpu" else train.log_every), IntervalStats(train.log_every)]
    if startup is not None:
        hooks.insert(0, startup)
    if dist.is_main_process():
        hooks.append(ProgressLog())
        if run.tracking_uri is not None:
            hooks += [RunRecord(run, config), MetricsLog(run), CheckpointLog(run)]
            if config.tracking.system_metrics:
                hooks.append(SystemMetrics(run))
            if run.samples and train.samples.every:
                hooks.append(SampleImages(run, config))
        if run.validation is not None:
            hooks.append(Validation(run, config, device))
    if train.step_log:
        hooks.append(StepLedger(train.step_log))
    if train.fail_at_step is not None:
        hooks.append(FaultInjection(train.fail_at_step, run.run_folder))
    return hooks
