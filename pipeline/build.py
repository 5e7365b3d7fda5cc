"""The `data build` / `data refresh` job: scan, decide what to process, run the plan, publish.

A refresh processes only photos that are new or whose bytes or category changed since the
parent (latest) version, copies the parent's rows of unchanged photos into the new version so
that it reads as a complete dataset on its own, and records removed photos. A change of any
setting that affects the output (see `processing_digest`) reprocesses everything.

The manifest lists the subjects a build affects (new, changed or removed photos, or all of them
after a settings change), which `finetune-many --affected` fine-tunes. `run_data_job` records
each build or refresh as an MLflow run (see its docstring for when tracking is on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline import __version__, tracking
from pipeline.backgrounds import BUNDLED_BACKGROUNDS, backgrounds_digest, list_backgrounds
from pipeline.config import Config, dump_config
from pipeline.dataplan import Cluster, build_dataset_plan, data_stages, ensure_ray, run_plan
from pipeline.hub import require_model
from pipeline.sources import SourceError, SourcePhoto, SourceScan, scan_source
from pipeline.versions import MANIFEST, DatasetStore, utc_now, write_json_atomic
from stages.records import CATEGORY, REJECT_REASON, REJECT_STAGE, SOURCE_PATH, SOURCE_SHA256, SOURCE_URI, SUBJECT_ID
from stages.write import DATA_SCHEMA, REJECT_SCHEMA, split_block

log = logging.getLogger(__name__)

INPUTS_FILE = "inputs.parquet"
REJECTS_FILE = "rejects.parquet"

INPUTS_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("subject_id", pa.string()),
        ("category", pa.string()),
        ("source_sha256", pa.string()),
        ("status", pa.string()),  # accepted | rejected
        ("rows", pa.int32()),
    ]
)


@dataclass
class BuildResult:
    status: str  # built | unchanged | failed
    version: str | None
    path: Path | None
    manifest: dict[str, Any] | None
    message: str


def processing_digest(config: Config, backgrounds_hash: str) -> str:
    """Hash of every setting that changes the rows a photo produces (not batch sizes or pools)."""
    data = config.data.model_dump(mode="json")
    runtime_only = (
        ("segment", "batch_size"), ("segment", "num_actors"), ("segment", "num_gpus"),
        ("matte", "concurrency"), ("matte", "num_gpus"), ("matte", "num_actors"), ("matte", "batch_size"),
    )
    for section, key in runtime_only:
        data[section].pop(key)
    data.pop("max_reject_fraction")
    data.pop("backgrounds")
    data["write"].pop("rows_per_file")
    payload = {"data": data, "clipseg": config.model_path("clipseg"), "backgrounds": backgrounds_hash}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _photo_dict(photo: SourcePhoto) -> dict[str, str]:
    return {
        "subject_id": photo.subject_id,
        "category": photo.category,
        "source_uri": photo.source_uri,
        "source_path": photo.source_path,
        "source_sha256": photo.sha256,
    }


def process_photos(photos: list[SourcePhoto], config: Config, dataset_version: str) -> tuple[pa.Table, pa.Table]:
    """A handful of photos -> (data rows, reject rows) with the published schemas, through the
    Ray plan's stages (pipeline.dataplan.data_stages), in their order, in this process.

    For a subject folder given to `finetune`: 3-6 photos cost less than starting Ray Data. They
    take the path of the plan without matting actors (matte_batch, photo by photo, then filter,
    composite and encode on the host): an actor's warm-up alone builds its Triton kernels
    (37 s the first time on a machine).
    Raises ConfigError for a CLIPSeg model or backgrounds folder that cannot be loaded.
    """
    data = config.data
    require_model("clipseg", config.model_path("clipseg"))
    backgrounds = list_backgrounds(data.backgrounds)
    batch = {
        name: np.array([getattr(p, attr) for p in photos], dtype=object)
        for name, attr in ((SUBJECT_ID, "subject_id"), (CATEGORY, "category"), (SOURCE_URI, "source_uri"),
                           (SOURCE_PATH, "source_path"), (SOURCE_SHA256, "sha256"))
    }
    batch[REJECT_STAGE] = np.full(len(photos), "", dtype=object)
    batch[REJECT_REASON] = np.full(len(photos), "", dtype=object)
    here = Cluster(cpus=1, gpus=torch.cuda.device_count(), pools=False)
    for stage in data_stages(config, here, backgrounds, dataset_version):
        batch = stage.in_process()(batch)
    rows, rejects, _ = split_block(pa.table({name: pa.array(list(column)) for name, column in batch.items()}))
    return rows, rejects


def _read_ledger(version_dir: Path) -> dict[str, dict[str, Any]]:
    table = pq.read_table(version_dir / INPUTS_FILE)
    return {row["source_uri"]: row for row in table.to_pylist()}


def _carry_forward(parent_dir: Path, staging: Path, accepted_uris: set[str], rejected_uris: set[str]) -> pa.Table:
    """Copy the parent's data rows of `accepted_uris` into staging/data; return its reject rows
    for `rejected_uris`."""
    keep = pa.array(sorted(accepted_uris), pa.string())
    for index, part in enumerate(sorted((parent_dir / "data").glob("*.parquet"))):
        table = pq.read_table(part)
        kept = table.filter(pc.is_in(table["source_uri"], value_set=keep))
        if kept.num_rows:
            pq.write_table(kept, staging / "data" / f"carried-{index:05d}.parquet", row_group_size=64)
    rejects = pq.read_table(parent_dir / REJECTS_FILE)
    return rejects.filter(pc.is_in(rejects["source_uri"], value_set=pa.array(sorted(rejected_uris), pa.string())))


def _scan_rejects(scan: SourceScan) -> pa.Table:
    return pa.table(
        {
            "source_uri": [p.source_uri for p, _ in scan.rejects],
            "subject_id": [p.subject_id for p, _ in scan.rejects],
            "category": [p.category for p, _ in scan.rejects],
            "source_sha256": [p.sha256 for p, _ in scan.rejects],
            "stage": ["scan"] * len(scan.rejects),
            "reason": [reason for _, reason in scan.rejects],
        },
        schema=REJECT_SCHEMA,
    )


def _collect_rejects(staging: Path, extra: list[pa.Table]) -> pa.Table:
    parts = [pq.read_table(p) for p in sorted((staging / "rejects").glob("*.parquet"))] + extra
    table = pa.concat_tables([t.cast(REJECT_SCHEMA) for t in parts]) if parts else REJECT_SCHEMA.empty_table()
    for p in (staging / "rejects").glob("*.parquet"):
        p.unlink()
    if (staging / "rejects").is_dir():
        (staging / "rejects").rmdir()
    return table.sort_by("source_uri")


def _write_ledger(staging: Path, scan: SourceScan, rejects: pa.Table) -> dict[str, Any]:
    """Write inputs.parquet (one row per input) and return per-subject counts.

    Fails loudly if any input has neither rows nor a reject record, or has both: that would be
    a bug in the pipeline, never a property of the input.
    """
    rows_per_uri: Counter[str] = Counter()
    for part in sorted((staging / "data").glob("*.parquet")):
        rows_per_uri.update(pq.read_table(part, columns=["source_uri"])["source_uri"].to_pylist())
    rejected = set(rejects["source_uri"].to_pylist())
    records, subjects = [], {}
    for photo in sorted(scan.inputs, key=lambda p: p.source_uri):
        rows = rows_per_uri.pop(photo.source_uri, 0)
        is_rejected = photo.source_uri in rejected
        if bool(rows) == is_rejected:
            raise RuntimeError(f"accounting error for {photo.source_uri}: rows={rows}, rejected={is_rejected}")
        status = "rejected" if is_rejected else "accepted"
        records.append({**{k: getattr(photo, k) for k in ("source_uri", "subject_id", "category")}, "source_sha256": photo.sha256, "status": status, "rows": rows})
        entry = subjects.setdefault(photo.subject_id, {"category": photo.category, "inputs": 0, "accepted": 0, "rejected": 0, "rows": 0})
        entry["inputs"] += 1
        entry[status] += 1
        entry["rows"] += rows
    if rows_per_uri:
        raise RuntimeError(f"accounting error: rows for photos that are not inputs: {sorted(rows_per_uri)[:5]}")
    pq.write_table(pa.Table.from_pylist(records, schema=INPUTS_SCHEMA), staging / INPUTS_FILE)
    return subjects


@dataclass
class RefreshPlan:
    """What a build does with each input, relative to the parent version."""

    to_process: list[SourcePhoto]
    unchanged: set[str]  # uris whose parent rows or reject records are carried forward
    carried_accepted: set[str]  # the unchanged ones that have rows
    removed: list[str]
    new: int
    changed: int
    affected: dict[str, dict[str, int]]  # subject_id -> {new, changed, removed, reprocessed} photo counts


def plan_refresh(scan: SourceScan, parent_ledger: dict[str, dict[str, Any]], reuse: bool) -> RefreshPlan:
    """Compare the scan with the parent's ledger. With `reuse` False (no parent, a full build, or
    changed settings) every photo is processed; new/changed/removed are still reported."""
    current = {p.source_uri: p for p in scan.inputs}

    def same(uri: str) -> bool:
        old = parent_ledger.get(uri)
        return old is not None and (old["source_sha256"], old["category"]) == (current[uri].sha256, current[uri].category)

    # Scan rejects are re-derived from subjects.csv every time, so they are never carried.
    unchanged = {p.source_uri for p in scan.photos if reuse and same(p.source_uri)}
    removed = sorted(set(parent_ledger) - set(current))
    affected: dict[str, dict[str, int]] = {}

    def mark(subject_id: str, kind: str) -> None:
        affected.setdefault(subject_id, dict.fromkeys(("new", "changed", "removed", "reprocessed"), 0))[kind] += 1

    for uri, photo in current.items():
        if uri not in parent_ledger:
            mark(photo.subject_id, "new")
        elif not same(uri):
            mark(photo.subject_id, "changed")
        elif not reuse:  # same photo, new settings: its rows differ all the same
            mark(photo.subject_id, "reprocessed")
    for uri in removed:
        mark(parent_ledger[uri]["subject_id"], "removed")
    return RefreshPlan(
        to_process=[p for p in scan.photos if p.source_uri not in unchanged],
        unchanged=unchanged,
        carried_accepted={u for u in unchanged if parent_ledger[u]["status"] == "accepted"},
        removed=removed,
        new=sum(1 for u in current if u not in parent_ledger),
        changed=sum(1 for u in current if u in parent_ledger and not same(u)),
        affected=dict(sorted(affected.items())),
    )


def affected_subjects(manifest: dict[str, Any]) -> list[str]:
    """Subjects whose photos a version added, changed or removed relative to its parent (all of
    them for a first build or after a settings change), in subject_id order."""
    return sorted(manifest.get("affected_subjects", {}))


def dataset_digest(version_dir: Path) -> str:
    """The version's identity: sha256 of its manifest, 16 hex digits. The same digest the
    trainer logs (pipeline.train.data.open_dataset), so a refresh's output and the runs that
    train on it share one MLflow dataset."""
    return hashlib.sha256((Path(version_dir) / MANIFEST).read_bytes()).hexdigest()[:16]


def run_data_job(source: str | Path, out: str | Path, config: Config, *, incremental: bool, progress: bool = True) -> BuildResult:
    """`build_dataset`, recorded as one MLflow run in `tracking.data_experiment`.

    Tracking is on when `tracking.enabled` and a server is configured (`tracking.uri` or
    $MLFLOW_TRACKING_URI, as on the cluster); without one the job says once that it is
    untracked, rather than leave an mlruns.db wherever it ran. A configured server that does
    not answer raises tracking.TrackingUnavailable before any photo is read, so a refresh never
    publishes a version whose lineage is missing.
    """
    uri = tracking.configured_tracking_uri(config.tracking.uri) if config.tracking.enabled else None
    if uri is None:
        log.info("MLflow: not tracking this data job (tracking.enabled is false or no tracking.uri / $MLFLOW_TRACKING_URI)")
        return build_dataset(source, out, config, incremental=incremental, progress=progress)
    tracking.check_reachable(uri)
    action = "refresh" if incremental else "build"
    run_id = tracking.start_data_run(uri, config.tracking.data_experiment, f"data-{action}-{utc_now()}", action)
    try:
        result = build_dataset(source, out, config, incremental=incremental, progress=progress)
    except BaseException as exc:
        tracking.finish_data_run(uri, run_id, status="error", message=f"{type(exc).__name__}: {exc}")
        raise
    nothing_new = result.status == "unchanged"
    new_version = result.path is not None and not nothing_new
    tracking.finish_data_run(
        uri, run_id, status=result.status, message=result.message, manifest=result.manifest, nothing_new=nothing_new,
        manifest_path=result.path / MANIFEST if new_version else None, digest=dataset_digest(result.path) if new_version else None,
    )
    return result


def build_dataset(source: str | Path, out: str | Path, config: Config, *, incremental: bool, progress: bool = True) -> BuildResult:
    """Build (incremental=False) or refresh (incremental=True) the dataset at `out` from `source`."""
    started = time.perf_counter()
    scan = scan_source(source)
    if not scan.inputs:
        raise SourceError(f"no input photos found under {scan.root}")
    scan_seconds = time.perf_counter() - started
    backgrounds = list_backgrounds(config.data.backgrounds)
    backgrounds_hash = backgrounds_digest(backgrounds)
    require_model("clipseg", config.model_path("clipseg"))
    digest = processing_digest(config, backgrounds_hash)
    store = DatasetStore(out)

    with store.lock():
        parent = store.latest_version() if incremental else None
        parent_manifest = store.read_manifest(parent) if parent else None
        if parent_manifest and parent_manifest["source_digest"] == scan.digest() and parent_manifest["processing_digest"] == digest:
            message = f"nothing changed since {parent}: processed 0 photos, no new version"
            log.info(message)
            return BuildResult("unchanged", parent, store.path(parent), parent_manifest, message)

        warnings = list(scan.warnings)
        settings_changed = parent_manifest is not None and parent_manifest["processing_digest"] != digest
        if settings_changed:
            warnings.append(f"settings that change the output differ from {parent}: every photo is reprocessed")
        parent_ledger = _read_ledger(store.path(parent)) if parent_manifest else {}
        plan = plan_refresh(scan, parent_ledger, reuse=not settings_changed)

        version = store.next_version()
        staging = store.new_staging(version)
        (staging / "data").mkdir()
        log.info(
            "%s: %d inputs, %d to process, %d unchanged, %d removed%s", version, len(scan.inputs),
            len(plan.to_process), len(plan.unchanged), len(plan.removed), f" (parent {parent})" if parent else "",
        )
        task_stats: list[dict[str, Any]] = []
        if plan.to_process:
            ensure_ray(config.ray)
            dataset = build_dataset_plan([_photo_dict(p) for p in plan.to_process], config, backgrounds, version)
            task_stats = run_plan(dataset, str(staging), progress=progress)
        extra_rejects = [_scan_rejects(scan)]
        if plan.unchanged:
            carried_rejected = plan.unchanged - plan.carried_accepted
            extra_rejects.append(_carry_forward(store.path(parent), staging, plan.carried_accepted, carried_rejected))
        rejects = _collect_rejects(staging, extra_rejects)
        pq.write_table(rejects, staging / REJECTS_FILE)
        subjects = _write_ledger(staging, scan, rejects)
        (staging / "config.yaml").write_text(dump_config(config))

        seconds: Counter[str] = Counter({"scan": scan_seconds})
        for stats in task_stats:
            seconds.update(stats["seconds"])
        manifest = _manifest(
            version, parent, scan, plan, subjects, rejects, staging, config,
            digest=digest, warnings=warnings, seconds=seconds, started=started,
            backgrounds={"folder": str(config.data.backgrounds or BUNDLED_BACKGROUNDS), "count": len(backgrounds), "digest": backgrounds_hash},
        )
        write_json_atomic(staging / MANIFEST, manifest)
        ok = manifest["status"] == "ok"
        path = store.publish(staging, version, make_latest=ok)

    if not ok:
        message = (
            f"{manifest['rejected']} of {manifest['inputs']} inputs rejected "
            f"({manifest['rejected'] / manifest['inputs']:.0%}) > data.max_reject_fraction "
            f"{config.data.max_reject_fraction:.0%}; {version} written to {path} but `latest` not moved"
        )
        return BuildResult("failed", version, path, manifest, message)
    message = f"{version}: {manifest['accepted']} accepted, {manifest['rejected']} rejected, {manifest['rows']} rows at {path}"
    return BuildResult("built", version, path, manifest, message)


def _manifest(
    version: str,
    parent: str | None,
    scan: SourceScan,
    plan: RefreshPlan,
    subjects: dict[str, Any],
    rejects: pa.Table,
    staging: Path,
    config: Config,
    *,
    digest: str,
    warnings: list[str],
    seconds: Counter[str],
    started: float,
    backgrounds: dict[str, Any],
) -> dict[str, Any]:
    data_files = [
        {"path": f"data/{p.name}", "rows": pq.ParquetFile(p).metadata.num_rows} for p in sorted((staging / "data").glob("*.parquet"))
    ]
    inputs = len(scan.inputs)
    ok = rejects.num_rows / inputs <= config.data.max_reject_fraction
    return {
        "version": version,
        "parent_version": parent,
        "created_at": utc_now(),
        "status": "ok" if ok else "failed",
        "package_version": __version__,
        "source": scan.root.as_uri(),
        "source_digest": scan.digest(),
        "processing_digest": digest,
        "inputs": inputs,
        "accepted": sum(s["accepted"] for s in subjects.values()),
        "rejected": rejects.num_rows,
        "rows": sum(f["rows"] for f in data_files),
        "processed": len(plan.to_process),
        "unchanged": len(plan.unchanged),
        "new": plan.new,
        "changed": plan.changed,
        "removed": len(plan.removed),
        "removed_uris": plan.removed,
        "affected_subjects": plan.affected,
        "subjects": subjects,
        "rejects_by_stage": dict(Counter(rejects["stage"].to_pylist())),
        "rejects_by_reason": dict(Counter(rejects["reason"].to_pylist()).most_common()),
        "warnings": warnings,
        "stage_seconds": {k: round(v, 3) for k, v in seconds.items()},
        "wall_seconds": round(time.perf_counter() - started, 3),
        "backgrounds": backgrounds,
        "models": {"clipseg": config.model_path("clipseg")},
        "schema": {"data": DATA_SCHEMA.names, "rejects": REJECT_SCHEMA.names},
        "files": data_files,
        "config": config.model_dump(mode="json"),
    }
