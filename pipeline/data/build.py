"""The `data build` / `data refresh` job: scan, decide what to process, run the plan, publish.

A refresh processes only photos that are new or whose bytes or category changed since the
parent (latest) version, copies the parent's rows of unchanged photos into the new version so
that it reads as a complete dataset on its own, and records removed photos. Scan rejects are
judged again by each scan and never carried: a copy rejected as a duplicate
(`data.duplicates`) whose kept photo is gone is processed as a photo of its own. A change of any
setting that affects the output (see `processing_digest`) reprocesses everything.

Before any work a refresh checks its parent against the parent's manifest (pipeline.data.verify):
a damaged file is an error that names it and the photos whose rows it held, unless
`reprocess_damaged`, which processes those photos again instead of carrying their rows. The
manifest records the sha256 of each file of the new version for the next check.

The manifest lists the subjects a build affects (new, changed or removed photos, or all of them
after a settings change), which `finetune-many --affected` fine-tunes. `run_data_job` records
each build or refresh as an MLflow run (see its docstring for when tracking is on).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
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
from pipeline.config import Config, dump_config, identity_settings
from pipeline.data.backgrounds import BUNDLED_BACKGROUNDS, backgrounds_digest, list_backgrounds
from pipeline.data.plan import Cluster, build_dataset_plan, data_stages, run_plan
from pipeline.data.sources import SourceError, SourcePhoto, SourceScan, scan_source
from pipeline.data.verify import CHECKSUMS, CONFIG_FILE, DamagedVersion, VersionCheck, check_version, record_checksums
from pipeline.data.versions import INPUTS_FILE, MANIFEST, REJECTS_FILE, DatasetStore, utc_now, write_json_atomic
from pipeline.hub import require_model
from pipeline.raycluster import ensure_ray
from stages.records import (
    CAPTION,
    CAPTION_SOURCE,
    CAPTION_USER,
    CATEGORY,
    REJECT_REASON,
    REJECT_STAGE,
    SOURCE_PATH,
    SOURCE_SHA256,
    SOURCE_URI,
    SUBJECT_ID,
)
from stages.write import DATA_SCHEMA, REJECT_SCHEMA, split_block

log = logging.getLogger(__name__)

INPUTS_SCHEMA = pa.schema(
    [
        ("source_uri", pa.string()),
        ("subject_id", pa.string()),
        ("category", pa.string()),
        ("source_sha256", pa.string()),
        ("status", pa.string()),  # accepted | rejected
        ("rows", pa.int32()),
        ("caption", pa.string()),  # the photo's own caption (captions.csv), "" = none
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
    """Hash of every data.* setting that may change the rows a photo produces: all but those
    config.py marks Runtime (pools, batch sizes, thresholds) or Input (the backgrounds folder,
    which links are read and whether copies are rejected, whose effect the backgrounds' and the
    source's digests record), and the models that make the rows: CLIPSeg, and the captioner when
    captions are on."""
    payload = {"data": identity_settings(config.data), "clipseg": config.model_identity("clipseg"), "backgrounds": backgrounds_hash}
    if config.data.caption.enabled:
        payload["captioner"] = config.model_identity("captioner")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _photo_dict(photo: SourcePhoto) -> dict[str, str]:
    return {
        "subject_id": photo.subject_id,
        "category": photo.category,
        "source_uri": photo.source_uri,
        "source_path": photo.source_path,
        "source_sha256": photo.sha256,
        "caption": photo.caption,
    }


def process_photos(photos: list[SourcePhoto], config: Config, dataset_version: str) -> tuple[pa.Table, pa.Table]:
    """A handful of photos -> (data rows, reject rows) with the published schemas, through the
    Ray plan's stages (pipeline.data.plan.data_stages), in their order, in this process.

    For a subject folder given to `finetune`: 3-6 photos cost less than starting Ray Data. They
    take the path of the plan without matting actors (matte_batch, photo by photo, then filter,
    composite and encode on the host): an actor's warm-up alone builds its Triton kernels
    (37 s the first time on a machine).
    Raises ConfigError for a CLIPSeg model, captioner or backgrounds folder that cannot be loaded.
    """
    data = config.data
    require_models(config)
    backgrounds = list_backgrounds(data.backgrounds.folder)
    batch = {
        name: np.array([getattr(p, attr) for p in photos], dtype=object)
        for name, attr in ((SUBJECT_ID, "subject_id"), (CATEGORY, "category"), (SOURCE_URI, "source_uri"),
                           (SOURCE_PATH, "source_path"), (SOURCE_SHA256, "sha256"), (CAPTION, "caption"))
    }
    batch[CAPTION_SOURCE] = np.array([CAPTION_USER if p.caption else "" for p in photos], dtype=object)
    batch[REJECT_STAGE] = np.full(len(photos), "", dtype=object)
    batch[REJECT_REASON] = np.full(len(photos), "", dtype=object)
    here = Cluster(cpus=1, gpus=torch.cuda.device_count(), pools=False)
    for stage in data_stages(config, here, backgrounds, dataset_version):
        batch = stage.in_process()(batch)
    rows, rejects, _ = split_block(pa.table({name: pa.array(list(column)) for name, column in batch.items()}))
    return rows, rejects


def require_models(config: Config) -> None:
    """ConfigError unless the build's models load: CLIPSeg, and the captioner with captions on."""
    require_model("clipseg", config.model_path("clipseg"))
    if config.data.caption.enabled:
        require_model("captioner", config.model_path("captioner"))


def _carry_forward(parent: VersionCheck, staging: Path, accepted_uris: set[str], rejected_uris: set[str]) -> pa.Table:
    """Copy the parent's data rows of `accepted_uris` into staging/data; return its reject rows
    for `rejected_uris`. Damaged files are never read: their photos are not in either set."""
    parent_dir = parent.version_dir
    keep = pa.array(sorted(accepted_uris), pa.string())
    for index, part in enumerate(sorted((parent_dir / "data").glob("*.parquet"))):
        if f"data/{part.name}" in parent.damaged_data:
            continue
        table = pq.read_table(part)
        kept = table.filter(pc.is_in(table["source_uri"], value_set=keep))
        if kept.num_rows:
            pq.write_table(kept, staging / "data" / f"carried-{index:05d}.parquet", row_group_size=64)
    if not rejected_uris:
        return REJECT_SCHEMA.empty_table()
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
        records.append({**{k: getattr(photo, k) for k in ("source_uri", "subject_id", "category", "caption")}, "source_sha256": photo.sha256, "status": status, "rows": rows})
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


def plan_refresh(
    scan: SourceScan, parent_ledger: dict[str, dict[str, Any]], reuse: bool, damaged: set[str] | None = None,
    rescan: set[str] | None = None,
) -> RefreshPlan:
    """Compare the scan with the parent's ledger. With `reuse` False (no parent, a full build, or
    changed settings) every photo is processed; new/changed/removed are still reported. Photos in
    `damaged` (their parent rows or reject records cannot be trusted) are processed again. Photos
    in `rescan` were scan rejects in the parent: this scan judged them afresh, so one it accepts
    is processed (a duplicate whose kept photo is gone), never carried as a reject."""
    current = {p.source_uri: p for p in scan.inputs}
    damaged = damaged or set()
    rescan = rescan or set()
    photos = {p.source_uri for p in scan.photos}

    def same(uri: str) -> bool:
        old = parent_ledger.get(uri)
        # A ledger from before captions.csv has no caption column: its photos had none of their own.
        return old is not None and (old["source_sha256"], old["category"], old.get("caption") or "") == (
            current[uri].sha256, current[uri].category, current[uri].caption
        )  # fmt: skip

    # Scan rejects are re-derived from the source every time, so they are never carried.
    unchanged = {u for u in photos if reuse and same(u) and u not in damaged and u not in rescan}
    removed = sorted(set(parent_ledger) - set(current))
    affected: dict[str, dict[str, int]] = {}

    def mark(subject_id: str, kind: str) -> None:
        affected.setdefault(subject_id, dict.fromkeys(("new", "changed", "removed", "reprocessed"), 0))[kind] += 1

    for uri, photo in current.items():
        if uri not in parent_ledger:
            mark(photo.subject_id, "new")
        elif not same(uri):
            mark(photo.subject_id, "changed")
        elif not reuse or uri in damaged or (uri in rescan and uri in photos):  # same photo, processed again:
            mark(photo.subject_id, "reprocessed")  # new settings, damaged rows, or a duplicate no more
        elif parent_ledger[uri]["status"] == "accepted" and uri not in photos:  # now a duplicate: its rows go
            mark(photo.subject_id, "changed")
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


def run_data_job(
    source: str | Path, out: str | Path, config: Config, *, incremental: bool, progress: bool = True, reprocess_damaged: bool = False
) -> BuildResult:
    """`build_dataset`, recorded as one MLflow run in `tracking.data_experiment`.

    Tracking is on when `tracking.enabled` and a server is configured (`tracking.uri` or
    $MLFLOW_TRACKING_URI, as on the cluster); without one the job says once that it is
    untracked, rather than leave an mlruns.db wherever it ran. A configured server that does
    not answer raises tracking.TrackingUnavailable before any photo is read, so a refresh never
    publishes a version whose lineage is missing.
    """
    uri = tracking.resolve_tracking_uri(config.tracking.uri, local_store=False) if config.tracking.enabled else None
    if uri is None:
        log.info("MLflow: not tracking this data job (tracking.enabled is false or no tracking.uri / $MLFLOW_TRACKING_URI)")
        return build_dataset(source, out, config, incremental=incremental, progress=progress, reprocess_damaged=reprocess_damaged)
    tracking.reachable_uri(uri, optional=True)
    action = "refresh" if incremental else "build"
    run_id = tracking.start_data_run(uri, config.tracking.data_experiment, f"data-{action}-{utc_now()}", action)
    try:
        result = build_dataset(source, out, config, incremental=incremental, progress=progress, reprocess_damaged=reprocess_damaged)
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


def build_dataset(
    source: str | Path, out: str | Path, config: Config, *, incremental: bool, progress: bool = True, reprocess_damaged: bool = False
) -> BuildResult:
    """Build (incremental=False) or refresh (incremental=True) the dataset at `out` from `source`.

    Raises SourceError for an unusable source or an `out` inside it, StoreError for an `out`
    that cannot be written, and DamagedVersion for a parent that fails its check (unless
    `reprocess_damaged` and only its rows or reject records are damaged).
    """
    started = time.perf_counter()
    _check_out_outside_source(source, out)
    scan = scan_source(
        source, follow_links=config.data.source.follow_links, max_bytes=config.data.decode.max_bytes, duplicates=config.data.duplicates
    )
    if not scan.inputs:
        raise SourceError(f"no input photos found under {scan.root}")
    scan_seconds = time.perf_counter() - started
    backgrounds = list_backgrounds(config.data.backgrounds.folder)
    backgrounds_hash = backgrounds_digest(backgrounds)
    require_models(config)
    digest = processing_digest(config, backgrounds_hash)
    store = DatasetStore(out)
    # A refresh with nothing to write needs no lock, so it also succeeds on a read-only OUT.
    # Under the lock the question is asked again: another build may have published meanwhile.
    if incremental and not reprocess_damaged and (quiet := _nothing_new(store, scan, digest)):
        return quiet

    with store.lock():
        store.recover()
        parent = store.latest_version() if incremental else None
        parent_check = _checked_parent(store, parent, reprocess_damaged)
        if parent_check and parent_check.ok and (quiet := _nothing_new(store, scan, digest)):
            return quiet
        parent_manifest = parent_check.manifest if parent_check else None

        warnings = list(scan.warnings)
        settings_changed = parent_manifest is not None and parent_manifest["processing_digest"] != digest
        if settings_changed:
            warnings.append(f"settings that change the output differ from {parent}: every photo is reprocessed")
        damaged = _damaged_inputs(parent_check)
        if damaged:
            warnings.append(f"{len(damaged)} photo(s) whose rows or reject records in {parent} are damaged: processed again")
        parent_ledger = parent_check.ledger if parent_check else {}
        plan = plan_refresh(scan, parent_ledger, reuse=not settings_changed, damaged=damaged, rescan=_scan_rejected(parent_check))

        version = store.next_version()
        staging = store.new_staging(version)
        try:
            manifest = _write_version(
                staging, version, parent, parent_check, scan, plan, config, backgrounds,
                digest=digest, backgrounds_hash=backgrounds_hash, warnings=warnings, scan_seconds=scan_seconds,
                started=started, progress=progress,
            )  # fmt: skip
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        ok = manifest["status"] == "ok"
        path = store.publish(staging, version) if ok else store.publish_failed(staging, version, keep=config.data.keep_failed)

    if not ok:
        kept = f"kept at {path}" if path else "not kept (data.keep_failed is 0)"
        message = (
            f"{manifest['rejected']} of {manifest['inputs']} inputs rejected "
            f"({manifest['rejected'] / manifest['inputs']:.0%}) > data.max_reject_fraction "
            f"{config.data.max_reject_fraction:.0%}; no new version, `latest` not moved; the failed build is {kept}"
        )
        return BuildResult("failed", version, path, manifest, message)
    message = f"{version}: {manifest['accepted']} accepted, {manifest['rejected']} rejected, {manifest['rows']} rows at {path}"
    return BuildResult("built", version, path, manifest, message)


def _check_out_outside_source(source: str | Path, out: str | Path) -> None:
    """SourceError for an OUT inside SOURCE: each build would scan the last one as photos."""
    source_dir, out_dir = Path(source).resolve(), Path(out).resolve()
    if out_dir.is_relative_to(source_dir):
        raise SourceError(f"--out {out_dir} is inside the source {source_dir}: choose a dataset folder outside it")


def _nothing_new(store: DatasetStore, scan: SourceScan, digest: str) -> BuildResult | None:
    """The `unchanged` result when the latest version has the same inputs and settings."""
    parent = store.latest_version()
    try:
        manifest = store.read_manifest(parent) if parent else None
    except (OSError, ValueError):
        return None  # the parent's check says what is wrong with it
    if not isinstance(manifest, dict):  # none, or damaged: the parent's check names the damage
        return None
    if (manifest.get("source_digest"), manifest.get("processing_digest")) != (scan.digest(), digest):
        return None
    if _missing_files(store.path(parent), manifest):  # the digests match, but the rows are gone
        return None
    message = f"nothing changed since {parent}: processed 0 photos, no new version"
    log.info(message)
    return BuildResult("unchanged", parent, store.path(parent), manifest, message)


def _missing_files(version_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Files the manifest lists that are not in `version_dir`: a stat each, no hashing, so that
    a refresh with nothing new stays cheap; the parent's check says what is wrong."""
    listed = manifest.get(CHECKSUMS) or {f.get("path", "") for f in manifest.get("files", []) if isinstance(f, dict)}
    return sorted(name for name in listed if not (version_dir / name).is_file())


def _checked_parent(store: DatasetStore, parent: str | None, reprocess_damaged: bool) -> VersionCheck | None:
    """The parent's check, before any work; DamagedVersion unless it passed, or its damage is
    confined to rows and reject records that `reprocess_damaged` lets the build make again."""
    if parent is None:
        return None
    check = check_version(store.path(parent))
    if not check.ok and not (reprocess_damaged and check.repairable):
        raise DamagedVersion(check.describe())
    if not check.has_checksums:
        log.warning("%s records no checksums (an older release built it): its files were checked for size and shape only", parent)
    return check


def _scan_rejected(parent: VersionCheck | None) -> set[str]:
    """The parent's inputs rejected at stage `scan`; none when its reject records are damaged
    (_damaged_inputs processes all its rejects again then)."""
    if parent is None or parent.rejects_damaged:
        return set()
    table = pq.read_table(parent.version_dir / REJECTS_FILE, columns=["source_uri", "stage"])
    return set(table.filter(pc.equal(table["stage"], "scan"))["source_uri"].to_pylist())


def _damaged_inputs(parent: VersionCheck | None) -> set[str]:
    """Photos whose parent rows or reject records cannot be carried."""
    if parent is None or parent.ok:
        return set()
    damaged = set(parent.damaged_uris)
    if parent.rejects_damaged:
        damaged |= {uri for uri, row in parent.ledger.items() if row["status"] == "rejected"}
    return damaged


def _write_version(
    staging: Path,
    version: str,
    parent: str | None,
    parent_check: VersionCheck | None,
    scan: SourceScan,
    plan: RefreshPlan,
    config: Config,
    backgrounds: list[tuple[str, str]],
    *,
    digest: str,
    backgrounds_hash: str,
    warnings: list[str],
    scan_seconds: float,
    started: float,
    progress: bool,
) -> dict[str, Any]:
    """Process, carry forward and write everything of `version` into `staging`; its manifest."""
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
        extra_rejects.append(_carry_forward(parent_check, staging, plan.carried_accepted, carried_rejected))
    rejects = _collect_rejects(staging, extra_rejects)
    pq.write_table(rejects, staging / REJECTS_FILE)
    subjects = _write_ledger(staging, scan, rejects)
    (staging / CONFIG_FILE).write_text(dump_config(config))

    seconds: Counter[str] = Counter({"scan": scan_seconds})
    for stats in task_stats:
        seconds.update(stats["seconds"])
    # The folder absolute: online composites (pipeline/train/data.py online_settings) read it
    # in a job whose working folder need not be this one.
    manifest = _manifest(
        version, parent, scan, plan, subjects, rejects, staging, config,
        digest=digest, warnings=warnings, seconds=seconds, started=started,
        backgrounds={"folder": str(Path(config.data.backgrounds.folder or BUNDLED_BACKGROUNDS).absolute()), "count": len(backgrounds), "digest": backgrounds_hash},
    )  # fmt: skip
    write_json_atomic(staging / MANIFEST, manifest)
    return manifest


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
        "models": {"clipseg": config.model_path("clipseg"), **({"captioner": config.model_path("captioner")} if config.data.caption.enabled else {})},
        "schema": {"data": DATA_SCHEMA.names, "rejects": REJECT_SCHEMA.names},
        "files": data_files,
        CHECKSUMS: record_checksums(staging),
        "config": config.model_dump(mode="json"),
    }
