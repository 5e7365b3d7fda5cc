"""Fine-tuning one subject: its photos -> a small training set -> the shared loop -> the subject's
artifact -> the MLflow registry. No math here; the methods are in methods.py.

`finetune_subject(config)`:
1. reads the subject's usable rows (target photo and composite) from a dataset version, or makes
   them from a folder of its photos through the dataset's stages (decode, CLIPSeg, trimap,
   matte, filter, composite; pipeline.data.build.process_photos), each bad photo a reject with a
   reason;
2. computes the fine-tune's key (`finetune_key`: base version, method, subject, dataset digest
   and the settings that change the weights). With registration on, a version of
   <prefix><subject_id> tagged with that key is reused (its alias moved, nothing trained or
   registered); the run is named finetune-<subject_id>-<method>-<key[:8]>, so a rerun with the
   same key resumes its run and one with new data or settings starts its own;
3. writes the rows as a one-subject dataset version under <storage_path>/<run_name>/inputs/
   (rows repeated up to a batch), with the subject's distinct original photos (photos/, what
   validation scores against), the ones whose mean embedding starts the subject (references/:
   up to `finetune.init_photos` distinct photos, as BLIP-Diffusion's fine-tuning, or composites
   with `finetune.init_from: composites`) and, for dreambooth, class-prior images the base
   model generates (PRIOR_CAPTION);
4. trains `finetune.method` with the shared loop (`pipeline.train.loop.train_loop`, its hooks
   and checks) on one Ray Train worker holding `finetune.num_gpus` GPUs (fractions let
   subjects share a GPU), or, with `in_process` (finetune-many's actors), in the calling
   process on its rows in memory (`dist.local_run`, pipeline/train/inmemory.py), where the
   base stays loaded from one subject to the next (pipeline/train/bases.py);
   validating every `finetune.validate_every` steps and at the end (pipeline/train/validation.py:
   images, DINO, CLIP-I and CLIP-T logged with step=; `finetune.patience` stops early);
5. picks a checkpoint (`finetune.select` over the validations, else the final one), copies its
   subject folder beside <finetune.out>/<subject_id>-<method>/ and renames it into place
   (pipeline/paths.py: the previous artifact stays whole until then) and, with
   `finetune.register_model`, logs it as a pyfunc registered as <prefix><subject_id>, tagged
   with the key, its step and its scores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline import tracking
from pipeline.config import FINETUNE_TRAITS, Config, ConfigError, identity_settings
from pipeline.data.versions import LATEST, MANIFEST
from pipeline.errors import JobFailed
from pipeline.paths import check_output_folder, replace_tree
from pipeline.raycluster import ensure_ray
from pipeline.train import dist
from pipeline.train.data import build_training_plan, open_dataset
from pipeline.train.ema import model_folder
from pipeline.train.hooks import RunInfo
from pipeline.train.inmemory import InMemoryShard
from pipeline.train.loop import train_loop
from pipeline.train.methods import PRIOR_CAPTION, REFERENCES_FOLDER, get_method
from pipeline.train.trainer import check_cluster, check_storage, check_training, checkpoint_step, fit, storage_path
from pipeline.train.validation import plan_validation, rank_records, read_records
from stages.records import CATEGORY, COMPOSITE, IMAGE, SOURCE_SHA256, SUBJECT_ID
from stages.train_inputs import CAPTION, decode_rgb

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
KEY_TAG = "finetune_key"  # registered version tag: the finetune_key it was trained with
_PRIOR_BATCH = 4  # class-prior images per generation batch
_DONE = "prior-done.json"  # written after the last prior image: the prior set counts only then
_LISTED = 20  # subject ids an error message lists before "and N more"
PHOTOS_FOLDER = "photos"  # beside the inputs' data: the subject's distinct original photos (PNG)
SCORE_TAGS = ("dino", "clip_i", "clip_t")  # registered version tags: the chosen checkpoint's validation scores


class SubjectError(JobFailed):
    """This subject cannot be fine-tuned (no usable photo); other subjects are unaffected."""


@dataclass
class SubjectRows:
    subject_id: str
    category: str
    rows: list[dict[str, Any]]  # usable rows: category, image, composite (encoded bytes), caption
    photos: list[bytes]  # the distinct original photos among the rows (encoded), in row order
    skipped: dict[str, int]  # reason -> rows that could not be used
    rejects: list[dict[str, str]]  # photo folder: source_uri, stage, reason of each photo not used
    dataset_version: str
    dataset_digest: str


@dataclass
class FinetuneResult:
    subject_id: str
    method: str
    artifact: str  # <finetune.out>/<subject_id>-<method>/
    artifact_bytes: int
    step: int
    seconds: float
    mlflow_run_id: str | None
    model_name: str | None
    model_version: str | None
    reused: bool = False  # True: the registry already held this fine-tune (same key); nothing was trained
    scores: dict[str, float] | None = None  # dino, clip_i, clip_t of the chosen step; None without validation


def check_finetune(config: Config) -> None:
    """The flags a fine-tune cannot run without; ConfigError names the key."""
    ft = config.finetune
    if not ft.subject:
        raise ConfigError("finetune.subject: give --subject, a dataset or a folder of the subject's photos")
    if not ft.subject_id:
        raise ConfigError("finetune.subject_id: give --subject-id")
    get_method(ft.method)
    if ft.validate_every:
        check_scorers(config)


def check_scorers(config: Config) -> None:
    """Validation's DINO and CLIP load (models.dino, models.clip), checked before any training:
    otherwise the first validation would fail after `finetune.validate_every` steps."""
    from pipeline.hub import require_model

    for key in ("dino", "clip"):
        try:
            require_model(key, config.model_path(key))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (fine-tuning validates with it; finetune.validate_every=0 and finetune.select=last "
                              "train without validation)") from None


def read_subject(config: Config) -> SubjectRows:
    """The subject's usable rows; undecodable ones are counted by reason. Raises SubjectError
    when none is usable and ConfigError for a missing source or category, or a subject the
    dataset does not hold."""
    ft = config.finetune
    source = Path(ft.subject).expanduser()
    if not source.exists():
        raise ConfigError(f"finetune.subject: not found: {source}")
    if not source.is_dir():
        raise ConfigError(f"finetune.subject: not a folder: {source} (a folder of the subject's photos, or a dataset from `data build`)")
    rejects: list[dict[str, str]] = []
    if (source / MANIFEST).is_file() or (source / LATEST).exists():
        info = open_dataset(str(source), "finetune.subject")
        candidates = []
        for file in info.files:
            columns = [SUBJECT_ID, CATEGORY, IMAGE, COMPOSITE, *([SOURCE_SHA256] if SOURCE_SHA256 in pq.read_schema(file).names else [])]
            table = pq.read_table(file, columns=columns, filters=[(SUBJECT_ID, "=", ft.subject_id)])
            candidates += table.to_pylist()
        if not candidates:
            raise ConfigError(
                f"finetune.subject_id: subject {ft.subject_id!r} is not in dataset {info.version} ({info.path}); "
                f"its subjects: {list_subjects(info.subjects)}"
            )
        version, digest = info.version, info.digest
        category = ft.category or candidates[0][CATEGORY]
        if not category:
            raise ConfigError("finetune.category: give --category (the subject's class noun, e.g. dog)")
    else:
        if not ft.category:
            raise ConfigError("finetune.category: give --category (the subject's class noun, e.g. dog)")
        category = ft.category
        candidates, rejects, version, digest = _rows_from_photos(config, source, category)
    rows, skipped, photos = [], {}, {}
    for row in candidates:
        try:
            decode_rgb(row[IMAGE])
            decode_rgb(row[COMPOSITE])
        except Exception as exc:  # PIL raises several types for corrupt files
            reason = type(exc).__name__
            skipped[reason] = skipped.get(reason, 0) + 1
            if sum(skipped.values()) == 1:
                log.warning("subject %s: skipping an undecodable photo (%s)", ft.subject_id, reason)
            continue
        rows.append({CATEGORY: category, IMAGE: row[IMAGE], COMPOSITE: row[COMPOSITE], CAPTION: ""})
        photos.setdefault(photo_id(row), row[IMAGE])
    if not rows:
        rejected = "; ".join(f"{r['source_uri']}: {r['stage']}: {r['reason']}" for r in rejects)
        raise SubjectError(
            f"subject {ft.subject_id!r}: no usable photo in {source} ({len(candidates) + len(rejects)} found, "
            f"skipped: {skipped or 'none'}{', rejected: ' + rejected if rejected else ''})"
        )
    return SubjectRows(ft.subject_id, category, rows, list(photos.values()), skipped, rejects, version, digest)


def photo_id(row: dict[str, Any]) -> str:
    """Which original photo a row was made from: its source's SHA-256 (each composite of a photo
    shares it), else the photo bytes' own."""
    return row.get(SOURCE_SHA256) or hashlib.sha256(row[IMAGE]).hexdigest()


def list_subjects(names: list[str]) -> str:
    """"a, b, c" for an error message, at most _LISTED of them, then "and N more"."""
    shown = ", ".join(names[:_LISTED]) or "none"
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _rows_from_photos(config: Config, folder: Path, category: str) -> tuple[list[dict[str, Any]], list[dict[str, str]], str, str]:
    """The photos under `folder` through the dataset's stages: (rows with IMAGE and COMPOSITE
    bytes, rejects with source_uri/stage/reason, version label, digest of photos and settings)."""
    from pipeline.data.backgrounds import backgrounds_digest, list_backgrounds
    from pipeline.data.build import process_photos, processing_digest
    from pipeline.data.sources import reject_duplicates, scan_photo_folder

    subject_id = config.finetune.subject_id
    # A fine-tune trains on its method's prompt, never on a caption: no captioner is loaded.
    tree = config.model_dump(mode="json")
    tree["data"]["caption"]["enabled"] = False
    config = Config.model_validate(tree)
    scan = scan_photo_folder(
        folder, subject_id, category, PHOTO_SUFFIXES, follow_links=config.data.source.follow_links,
        max_bytes=config.data.decode.max_bytes,
    )
    if config.data.duplicates == "reject":
        reject_duplicates(scan)
    photos = scan.photos
    rejects = [{"source_uri": p.source_uri, "stage": "scan", "reason": reason} for p, reason in scan.rejects]
    if not photos:
        found = "; ".join(f"{r['source_uri']}: {r['reason']}" for r in rejects) or "none found"
        raise SubjectError(f"subject {subject_id!r}: no photo ({', '.join(PHOTO_SUFFIXES)}) in {folder} ({found})")
    version = f"photos:{folder.name}"
    data, rejected = process_photos(photos, config, version)
    rejects += [{"source_uri": r["source_uri"], "stage": r["stage"], "reason": r["reason"]} for r in rejected.to_pylist()]
    for r in rejects:
        log.warning("subject %s: photo %s rejected at %s: %s", subject_id, r["source_uri"], r["stage"], r["reason"])
    settings = processing_digest(config, backgrounds_digest(list_backgrounds(config.data.backgrounds.folder)))
    identity = "".join(f"{p.source_uri}\t{p.sha256}\n" for p in photos) + settings
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    log.info("subject %s: %d of %d photos usable, %d rows", subject_id, len(photos) + len(scan.rejects) - len(rejects),
             len(photos) + len(scan.rejects), data.num_rows)
    columns = [IMAGE, COMPOSITE, *([SOURCE_SHA256] if SOURCE_SHA256 in data.column_names else [])]
    return data.select(columns).to_pylist(), rejects, version, digest


def base_reference(config: Config, uri: str | None) -> str:
    """`finetune.base` (else models.blip_diffusion) as it names a fixed model: a registry alias
    is pinned to the version it points at now (through the tracking server `uri`)."""
    base = config.finetune.base or config.model_path("blip_diffusion")
    if base.startswith("models:/") and "@" in base and uri:
        name, _, alias = base[len("models:/") :].partition("@")
        return f"models:/{name}/{tracking.registered_version(uri, name, alias=alias)}"
    return base


def finetune_key(config: Config, category: str, dataset_digest: str, base: str) -> str:
    """16 hex digits naming what a fine-tune produces: the same base model, subject, category,
    dataset digest and settings give the same key (and the model the registry already holds for
    it). The settings are every finetune.* and train.* field config.py does not mark Runtime or
    Input, less the train.* fields the method's recipe sets from finetune.* (_recipe)."""
    train = identity_settings(config.train)
    for key in _recipe(config):
        train.pop(key, None)
    payload = {"base": base, "category": category, "dataset_digest": dataset_digest,
               "finetune": identity_settings(config.finetune), "train": train}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def registered_for(config: Config, uri: str | None, key: str) -> str | None:
    """The registered version of this subject trained with `key`, or None (also with
    registration or tracking off)."""
    ft = config.finetune
    if not (ft.register_model and uri):
        return None
    return tracking.find_model_version(uri, f"{ft.register_prefix}{ft.subject_id}", {KEY_TAG: key})


def write_inputs(config: Config, subject: SubjectRows, folder: Path, base: str) -> int:
    """A one-subject dataset version in `folder` (manifest, data/, photos/, references/); returns
    its rows."""
    ft = config.finetune
    (folder / "data").mkdir(parents=True, exist_ok=True)
    _write_pngs(subject.photos, folder / PHOTOS_FOLDER)
    starts = subject.photos if ft.init_from == "photos" else [row[COMPOSITE] for row in subject.rows]
    _write_pngs(starts[: ft.init_photos], folder / REFERENCES_FOLDER)
    rows = list(subject.rows)
    if FINETUNE_TRAITS[ft.method].class_prior:
        rows += [
            {CATEGORY: subject.category, IMAGE: png, COMPOSITE: png, CAPTION: PRIOR_CAPTION}
            for png in _prior_images(config, subject.category, folder / "prior", base)
        ]
    while len(rows) < ft.batch_size:  # every step needs a full batch
        rows += rows[: ft.batch_size - len(rows)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "data" / "part-00000.parquet")
    manifest = {"version": subject.dataset_version, "rows": len(rows), "subjects": {subject.subject_id: {"category": subject.category, "rows": len(rows)}}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return len(rows)


def _prior_images(config: Config, category: str, folder: Path, base: str) -> list[bytes]:
    """`finetune.prior_images` PNGs of "a <category>" from the base model, made once per run
    folder (a rerun reuses them once the completion record exists)."""
    from pipeline.model import BlipDiffusion
    from pipeline.model.subject import generate_from_text

    ft, size = config.finetune, config.train.resolution
    done = folder / _DONE
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        use_gpu = config.train.gpu and torch.cuda.is_available()
        model = BlipDiffusion.from_pretrained(base, dtype=torch.float16 if use_gpu else torch.float32, device="cuda" if use_gpu else "cpu")
        log.info("generating %d class-prior images of %r", ft.prior_images, category)
        for start in range(0, ft.prior_images, _PRIOR_BATCH):
            count = min(_PRIOR_BATCH, ft.prior_images - start)
            images = generate_from_text(
                model, [f"a {category}"], num_images=count, steps=ft.prior_steps, height=size, width=size, seed=start
            )
            for i, image in enumerate(images):
                image.save(folder / f"{start + i:04d}.png")
        done.write_text(json.dumps({"images": ft.prior_images, "category": category}) + "\n")
    return [p.read_bytes() for p in sorted(folder.glob("*.png"))[: ft.prior_images]]


def _write_pngs(images: list[bytes], folder: Path) -> None:
    """`folder` holds exactly `images` (encoded) as 00.png, 01.png, ...: a rerun with other
    settings leaves none of the last run's behind."""
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for i, data in enumerate(images):
        PIL.Image.fromarray(decode_rgb(data)).save(folder / f"{i:02d}.png")


def resolve_base(config: Config) -> str:
    """`finetune.base` (else models.blip_diffusion) as something from_pretrained loads: a
    registry URI is downloaded through pipeline.tracking."""
    base = config.finetune.base or config.model_path("blip_diffusion")
    if base.startswith("models:/"):
        uri = tracking.resolve_tracking_uri(config.tracking.uri)
        return str(tracking.download_model(uri, base))
    return base


def _recipe(config: Config) -> dict[str, Any]:
    """The train.* values every fine-tune sets from finetune.* (its other train.* settings are
    the user's): one worker, the method's steps, batch and learning rate, no warm-up, no subject
    dropout, the subject's stored composites, no registration as a base, no sample images; a
    checkpoint at each validation (train.keep_checkpoints of them kept, the best first) or,
    without validation, one at the end."""
    ft = config.finetune
    every, keep = (min(ft.validate_every, ft.steps), config.train.keep_checkpoints) if ft.validate_every else (ft.steps, 1)
    return {
        "method": ft.method, "workers": 1, "steps": ft.steps, "batch_size": ft.batch_size, "grad_accum": 1,
        "lr": ft.learning_rate(), "lr_scaling": "none", "reference_batch": Config.model_fields["train"].default.reference_batch, "weight_decay": ft.weight_decay, "warmup_steps": 0, "drop_subject_prob": 0.0,
        "precompute": False, "composite": "stored", "checkpoint_every": every, "keep_checkpoints": keep, "register_as": None, "fail_at_step": None,
    }


def training_config(config: Config, inputs: Path, base: str, run_name: str) -> Config:
    """The `train:` settings of a fine-tune: the method's recipe on the one-subject inputs."""
    tree = config.model_dump(mode="json")
    tree["models"]["blip_diffusion"] = base
    tree["train"].update(_recipe(config), data=str(inputs), run_name=run_name)
    tree["train"]["samples"]["every"] = 0
    return Config.model_validate(tree)


def finetune_subject(config: Config, in_process: bool = False) -> FinetuneResult:
    """Fine-tune `config.finetune.subject_id`; see the module docstring. Raises ConfigError
    (bad settings), SubjectError (no usable photo), Ray Train's TrainingFailedError or, with
    `in_process`, what the loop raised."""
    check_finetune(config)
    ft = config.finetune
    check_output_folder(Path(ft.out).expanduser(), "finetune.out")  # before the training, not after it
    check_storage(config.train.storage_path)
    start = time.perf_counter()
    subject = read_subject(config)
    uri = tracking.resolve_tracking_uri(config.tracking.uri) if config.tracking.enabled else None
    base_ref = base_reference(config, uri)
    key = finetune_key(config, subject.category, subject.dataset_digest, base_ref)
    reused = registered_for(config, uri, key)
    if reused is not None:
        return _reuse(config, uri, reused, start)
    base = resolve_base(config)
    run_name = f"finetune-{ft.subject_id}-{ft.method}-{key[:8]}"
    storage = storage_path(config.train.storage_path)
    if "://" in storage:
        raise ConfigError("train.storage_path: fine-tuning writes its inputs locally; give a local or shared folder")
    inputs = Path(storage) / run_name / "inputs"
    rows = write_inputs(config, subject, inputs, base)
    log.info("fine-tuning %s (%s, %d rows, %s) with %s for %d steps", ft.subject_id, subject.category, rows, subject.dataset_version, ft.method, ft.steps)
    config = config.model_copy(update={"finetune": ft.model_copy(update={"category": subject.category})})
    train_config = training_config(config, inputs, base, run_name)
    plan = asdict(plan_validation(config, subject.category, inputs / PHOTOS_FOLDER)) if ft.validate_every else None
    tags = {"dataset_version": subject.dataset_version, "dataset_digest": subject.dataset_digest, "git_commit": tracking.git_commit(),
            "method": ft.method, "subject_id": ft.subject_id, KEY_TAG: key}
    with tracking.open_run(config.tracking, run_name, tags) as run_id:
        train_fn = _fit_in_process if in_process else _fit
        final = train_fn(train_config, storage, run_name, uri, run_id, plan)
        checkpoint, step, scores = choose_checkpoint(Path(storage) / run_name, ft.select, final)
        if run_id and scores is not None:
            tracking.set_tag(uri, run_id, "selected_step", str(step))
        out = Path(ft.out).expanduser().resolve()
        # The EMA copy when the run kept one (train.ema_decay), else the trained weights.
        artifact = replace_tree(model_folder(checkpoint, get_method(ft.method).MODEL_FOLDER), out / f"{ft.subject_id}-{ft.method}", out)
        size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
        name = version = None
        if ft.register_model and run_id:
            name = f"{ft.register_prefix}{ft.subject_id}"
            version_tags = tags | {"category": subject.category, "base_model": base_ref,
                                   "step": str(step), "artifact_bytes": str(size), "run_name": run_name,
                                   **{k: f"{v:.6f}" for k, v in (scores or {}).items()}}
            version = tracking.log_subject_model(uri, run_id, artifact, name, version_tags, ft.alias, config.serve.limits)
    return FinetuneResult(ft.subject_id, ft.method, str(artifact), size, step, time.perf_counter() - start, run_id, name, version,
                          scores=scores)


def choose_checkpoint(run_folder: Path, rule: str, final: Path) -> tuple[Path, int, dict[str, float] | None]:
    """(checkpoint folder, step, scores) to register: the validation `rule` ranks first among the
    run's records, or `final` (the run's last checkpoint) with no scores when it has none."""
    records = read_records(run_folder)
    if not records:
        return final, checkpoint_step(final), None
    best = rank_records(records, rule)[0]
    folder = run_folder / best["checkpoint"]
    if not folder.is_dir():  # the Validation hook keeps the best; a missing one is a bug, not a choice
        raise SubjectError(f"the selected checkpoint {folder} (finetune.select {rule}) is gone")
    log.info("selected step %d of %s (finetune.select %s): %s", best["step"], run_folder.name, rule,
             ", ".join(f"{k} {best[k]:.4f}" for k in SCORE_TAGS))
    return folder, best["step"], {k: float(best[k]) for k in SCORE_TAGS}


def _reuse(config: Config, uri: str, version: str, start: float) -> FinetuneResult:
    """The result of a fine-tune whose key the registry already holds: nothing is trained or
    registered, the alias moves to that version. The artifact is the local copy when there is
    one (another machine may have trained it)."""
    ft = config.finetune
    name = f"{ft.register_prefix}{ft.subject_id}"
    found = tracking.model_version_info(uri, name, version)
    log.info("%s: reusing models:/%s/%s, registered for the same base, method, data and settings", ft.subject_id, name, version)
    tracking.set_alias(uri, name, ft.alias, version)
    artifact = Path(ft.out).expanduser().resolve() / f"{ft.subject_id}-{ft.method}"
    return FinetuneResult(
        ft.subject_id, ft.method, str(artifact) if artifact.is_dir() else "", int(found["tags"].get("artifact_bytes", 0)),
        int(found["tags"].get("step", 0)), time.perf_counter() - start, found["run_id"], name, version, reused=True,
        scores={k: float(found["tags"][k]) for k in SCORE_TAGS if k in found["tags"]} or None,
    )


def _fit(config: Config, storage: str, run_name: str, uri: str | None, run_id: str | None, validation: dict | None) -> Path:
    """Run the shared loop on one Ray Train worker (CPUs `train.cpus_per_worker`, GPUs
    `finetune.num_gpus` with `train.gpu`, so several subjects can share a GPU), validating with
    the `validation` plan; returns the final checkpoint folder."""
    train = config.train
    info, processor = check_training(config)
    ensure_ray(config.ray)
    check_cluster(config)
    run = RunInfo(run_name=run_name, run_folder=f"{storage}/{run_name}", tracking_uri=uri, mlflow_run_id=run_id, dataset=info.as_run_input(),
                  validation=validation)
    resources = {"CPU": train.cpus_per_worker} | ({"GPU": config.finetune.num_gpus} if train.gpu else {})
    result = fit(config, run_name, resources, {"train": build_training_plan(info, config, processor)}, run)
    # A rerun of a finished run trains nothing new and may report no checkpoint: take the newest.
    return Path(result.checkpoint.path) if result.checkpoint is not None else _newest_checkpoint(Path(storage) / run_name)


def _fit_in_process(config: Config, storage: str, run_name: str, uri: str | None, run_id: str | None, validation: dict | None) -> Path:
    """Run the shared loop here, as rank 0 of 1 (this process holds the resources: a
    finetune-many actor), validating with the `validation` plan; returns the final checkpoint
    folder."""
    train = config.train
    info, processor = check_training(config)
    if train.gpu and not torch.cuda.is_available():
        raise ConfigError("train.gpu: no GPU visible to this worker")
    run = RunInfo(run_name=run_name, run_folder=f"{storage}/{run_name}", tracking_uri=uri, mlflow_run_id=run_id, dataset=info.as_run_input(),
                  validation=validation)
    local = dist.LocalRun(
        shard=InMemoryShard(info, processor, train.resolution, train.crop),
        run_folder=Path(run.run_folder),
        device=torch.device("cuda", torch.cuda.current_device()) if train.gpu else torch.device("cpu"),
        keep=None if validation else train.keep_checkpoints,  # the Validation hook keeps the best
    )
    with dist.local_run(local):
        train_loop({"config": config.model_dump(mode="json"), "run": asdict(run)})
    return _newest_checkpoint(local.run_folder)


def _newest_checkpoint(run_folder: Path) -> Path:
    found = dist.newest_checkpoint(run_folder)
    if found is None:
        raise SubjectError(f"no checkpoint in {run_folder}")
    return found
