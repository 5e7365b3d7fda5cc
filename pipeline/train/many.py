"""Fine-tuning every subject of a dataset as one Ray job (`subjectforge finetune-many`).

A pool of `finetune.concurrency` long-lived Ray actors (`SubjectTrainer`; each holds
`train.cpus_per_worker` CPUs and, with `train.gpu`, `finetune.num_gpus` of a GPU, so fractions
let several share one) fine-tunes the subjects one after another: `finetune_subject` runs the
shared loop inside the actor (no Ray Train run per subject), and the actor keeps the base model
loaded from one subject to the next, restored exactly before each (pipeline/train/bases.py), so
only its first subject pays the load. A subject that fails is recorded with its error and
resubmitted up to `finetune.max_retries` times while the others go on; an actor that dies is
replaced. The result is one row per subject, in the order given.

With `finetune.affected_only` only the subjects the version's manifest lists as affected (new,
changed or removed photos relative to its parent: what a scheduled refresh changed) are
fine-tuned; an affected subject with no rows left in the version is reported as skipped. A
subject whose fine-tune the registry already holds (same key, see pipeline.train.finetune) is
reported as reused and costs no training.
"""

from __future__ import annotations

import csv
import gc
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from pipeline.config import Config, ConfigError
from pipeline.data.build import affected_subjects
from pipeline.data.versions import MANIFEST
from pipeline.paths import check_output_folder
from pipeline.raycluster import ensure_ray
from pipeline.train import bases
from pipeline.train.data import open_dataset
from pipeline.train.finetune import FinetuneResult, check_scorers, finetune_subject, list_subjects
from pipeline.train.trainer import check_storage

log = logging.getLogger(__name__)

SUMMARY = "finetune-many.csv"  # written to finetune.out


@dataclass
class SubjectOutcome:
    subject_id: str
    status: str  # ok | reused (already registered) | skipped (affected, but no rows left) | failed
    attempts: int
    seconds: float  # wall time of the last attempt
    artifact_bytes: int
    model_version: str | None
    error: str  # the last attempt's error, "" when ok
    base_loads: int = 0  # bases its actor read from disk for it: 1 for an actor's first subject, else 0
    step: int | None = None  # the registered checkpoint's step (finetune.select)
    dino: float | None = None  # its validation scores; None without validation
    clip_i: float | None = None
    clip_t: float | None = None


def subject_trainer_options(config: Config) -> dict[str, Any]:
    """Ray options of a finetune-many actor (SubjectTrainer): the CPUs of a training
    worker and `finetune.num_gpus` of a GPU with `train.gpu` (fractions let subjects share one).
    No restarts: the pool replaces an actor that died, and the subject it held is retried."""
    gpus = config.finetune.num_gpus if config.train.gpu else 0
    return {"num_cpus": config.train.cpus_per_worker, "num_gpus": gpus, "max_restarts": 0, "max_task_retries": 0}


class SubjectTrainer:
    """Ray actor: fine-tunes one subject per call in this process, keeping the loaded base."""

    def __init__(self) -> None:
        bases.keep_bases()

    def finetune(self, config_json: dict[str, Any]) -> tuple[FinetuneResult, int]:
        """(the result, bases this call loaded from disk: 0 when the kept one served)."""
        loads = bases.loads
        try:
            return finetune_subject(Config.model_validate(config_json), in_process=True), bases.loads - loads
        finally:
            gc.collect()  # the subject's optimizer, CUDA graphs and adapters, before the next one


def subject_ids(config: Config) -> tuple[list[str], list[str]]:
    """(subjects to fine-tune, affected subjects without rows): `finetune.subjects`, else every
    subject listed in the dataset's manifest; with `finetune.affected_only`, only the affected
    ones among them (possibly none)."""
    ft = config.finetune
    info = open_dataset(ft.subject, "finetune.subject")
    missing = [s for s in ft.subjects or [] if s not in info.subjects]
    if missing and not ft.affected_only:
        raise ConfigError(
            f"finetune.subjects: {list_subjects(missing)} not in dataset {info.version} ({info.path}); "
            f"its subjects: {list_subjects(info.subjects)}"
        )
    wanted = ft.subjects or info.subjects
    if not ft.affected_only:
        if not wanted:
            raise ConfigError(f"finetune.subjects: dataset {info.version} lists no subjects")
        return list(wanted), []
    manifest = json.loads((Path(info.path) / MANIFEST).read_text())
    if "affected_subjects" not in manifest:
        raise ConfigError(
            f"finetune.affected_only: dataset {info.version} does not list its affected subjects "
            "(not made by `data build|refresh`); leave --affected out"
        )
    affected = [s for s in affected_subjects(manifest) if ft.subjects is None or s in ft.subjects]
    return [s for s in affected if s in info.subjects], [s for s in affected if s not in info.subjects]


def finetune_many(config: Config) -> list[SubjectOutcome]:
    """Fine-tune each subject of `finetune.subject` (a dataset); see the module docstring."""
    ft = config.finetune
    subjects, gone = subject_ids(config)
    skipped = {s: SubjectOutcome(s, "skipped", 0, 0.0, 0, None, "affected, but no rows left in this version") for s in gone}
    for s in gone:
        log.warning("subject %s: affected, but has no rows in this version (photos removed or rejected); not fine-tuned", s)
    if not subjects:
        return list(skipped.values())
    if ft.validate_every:
        check_scorers(config)  # before any actor starts, not at each subject's first validation
    check_output_folder(Path(ft.out).expanduser(), "finetune.out")  # else every subject fails, then the summary
    check_storage(config.train.storage_path)
    ensure_ray(config.ray)
    size = min(ft.concurrency, len(subjects))
    check_pool(config, size)
    trainer = ray.remote(SubjectTrainer).options(**subject_trainer_options(config))
    idle = [trainer.remote() for _ in range(size)]
    attempts = dict.fromkeys(subjects, 0)
    outcomes: dict[str, SubjectOutcome] = {}
    queue, running = list(subjects), {}
    try:
        while queue or running:
            while queue and idle:
                subject, actor = queue.pop(0), idle.pop(0)
                attempts[subject] += 1
                subject_config = config.model_copy(update={"finetune": ft.model_copy(update={"subject_id": subject, "category": None})})
                running[actor.finetune.remote(subject_config.model_dump(mode="json"))] = (subject, actor, time.perf_counter())
            [done], _ = ray.wait(list(running), num_returns=1)
            subject, actor, started = running.pop(done)
            seconds = time.perf_counter() - started
            try:
                result, loads = ray.get(done)
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as exc:
                if isinstance(exc, ray.exceptions.RayActorError):  # the process died: a new one takes its place
                    actor = trainer.remote()
                cause = getattr(exc, "cause", None)
                error = f"{type(cause).__name__}: {cause}" if cause is not None else f"{type(exc).__name__}: {exc}"
                log.warning("subject %s failed (attempt %d of %d): %s", subject, attempts[subject], ft.max_retries + 1, error)
                outcomes[subject] = SubjectOutcome(subject, "failed", attempts[subject], seconds, 0, None, error)
                if attempts[subject] <= ft.max_retries:
                    queue.append(subject)
                idle.append(actor)
                continue
            idle.append(actor)
            status = "reused" if result.reused else "ok"
            scores = result.scores or {}
            outcomes[subject] = SubjectOutcome(subject, status, attempts[subject], result.seconds, result.artifact_bytes,
                                               result.model_version, "", loads, result.step, scores.get("dino"),
                                               scores.get("clip_i"), scores.get("clip_t"))
            log.info("subject %s done in %.1f s (%d bytes)", subject, result.seconds, result.artifact_bytes)
    finally:
        for actor in idle + [actor for _, actor, _ in running.values()]:
            ray.kill(actor)  # their GPUs and the kept bases go back to the cluster now
    rows = [outcomes[s] for s in subjects] + list(skipped.values())
    write_summary(rows, Path(ft.out).expanduser() / SUMMARY)
    return rows


def check_pool(config: Config, size: int) -> None:
    """The cluster can hold `size` actors at once; otherwise the subjects given to the ones Ray
    cannot place would wait forever. Raises ConfigError."""
    ft, train = config.finetune, config.train
    have = ray.cluster_resources()
    need = {"CPU": size * train.cpus_per_worker} | ({"GPU": size * ft.num_gpus} if train.gpu else {})
    short = {kind: amount for kind, amount in need.items() if have.get(kind, 0) + 1e-9 < amount}
    if short:
        raise ConfigError(
            f"finetune.concurrency: {size} actors need "
            + ", ".join(f"{amount:g} {kind}s" for kind, amount in short.items())
            + " (train.cpus_per_worker, finetune.num_gpus each); the cluster has "
            + ", ".join(f"{have.get(kind, 0):g} {kind}s" for kind in short)
        )


def write_summary(rows: list[SubjectOutcome], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(SubjectOutcome.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def format_table(rows: list[SubjectOutcome]) -> str:
    """The final table: subject, status, attempts, time, artifact size, version, the registered
    checkpoint's step and validation scores, error."""
    lines = [f"{'subject':<20} {'status':<7} {'tries':>5} {'time_s':>8} {'artifact_MiB':>12} {'version':>7} {'step':>5} "
             f"{'DINO':>6} {'CLIP-I':>6} {'CLIP-T':>6}  error"]
    for r in rows:
        scores = " ".join(f"{'-' if v is None else f'{v:.3f}':>6}" for v in (r.dino, r.clip_i, r.clip_t))
        lines.append(
            f"{r.subject_id:<20} {r.status:<7} {r.attempts:>5} {r.seconds:>8.1f} {r.artifact_bytes / 2**20:>12.2f} "
            f"{r.model_version or '-':>7} {'-' if r.step is None else r.step:>5} {scores}  {r.error[:120]}"
        )
    return "\n".join(lines)
