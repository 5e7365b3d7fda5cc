"""The DreamBench evaluation job: generate, score, report, log.

`run_evaluation(config)` makes `images_per_prompt` images for every subject and prompt (only
those not already on disk, so a killed run resumes), scores each against the subject's real
photos and its prompt, and writes, under the output folder::

    images/<subject>/<prompt slug>/<k>.png   the generated images (present = done)
    images.csv                               DINO, CLIP-I, CLIP-T per image
    scores.csv                               per subject, then overall
    summary.md                               the table, the settings, the published results
    grids/<subject>.png                      real photos, then one row per prompt
    generation.json                          what made the images; a resumed run must match it
    evaluate.yaml                            the resolved config of the last run
    model/                                   a registered subject (and base), downloaded once
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline.config import BUNDLED_DATASETS_DIR, Config, ConfigError, check_alias, dump_config
from pipeline.evaluation import benchmark, plan, report
from pipeline.evaluation.metrics import summarize_scores
from pipeline.evaluation.workers import load_rgb
from pipeline.paths import check_output_folder, remove_tree

if TYPE_CHECKING:
    from pipeline.model.subject import SubjectSpec

log = logging.getLogger(__name__)

REGISTRY_SCHEME = "models:/"
FINGERPRINT_FILE = "generation.json"
CONFIG_FILE = "evaluate.yaml"
CONTROL_DIR = "control"  # evaluate.control: the ControlNet-steered images, their tables and fingerprint
DEFAULT_OUT_ROOT = "subjectforge-eval"
DEFAULT_BENCHMARK = BUNDLED_DATASETS_DIR / "dreambench"
DEFAULT_PHOTOS = BUNDLED_DATASETS_DIR / "dreambench-mini"
MODEL_DIR = "model"


@dataclass(frozen=True)
class ModelRef:
    """The model under evaluation: what `BlipDiffusion.from_pretrained` loads (`path`), the
    fine-tuned subject applied on top of it (`subject`, a folder of pipeline/model/subject.py),
    and the registered version it is, so the scores can be tagged on that version."""

    uri: str  # as the user gave it
    path: str  # checkpoint folder or Hub id; for a registry URI, models:/NAME/VERSION until fetched
    registered_name: str | None = None
    registered_version: str | None = None
    subject: str | None = None


@dataclass
class EvaluationResult:
    out: Path
    model: ModelRef
    per_subject: dict[str, dict[str, float]]  # subject_id -> {dino, clip_i, clip_t}
    overall: dict[str, float]  # mean over subjects
    images: list[dict[str, Any]]  # per image: subject_id, prompt, index, path and the scores
    generated: int  # images made by this run
    reused: int  # images found on disk from an earlier run
    params: dict[str, Any] = field(default_factory=dict)  # settings worth logging with the scores
    mlflow_run_id: str | None = None
    control: dict[str, float] | None = None  # evaluate.control: the steered images' overall scores


# Logs a finished evaluation somewhere (`log_to_mlflow`, or a test's stand-in); returns a run id.
ResultLogger = Callable[[EvaluationResult, Config], str | None]


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    body = uri[len(REGISTRY_SCHEME) :]
    match = re.fullmatch(r"([^/@]+)(?:@([^/]+)|/(\d+))", body)
    if not uri.startswith(REGISTRY_SCHEME) or match is None:
        raise ConfigError(f"--model {uri!r}: a registry URI reads models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias, version = match.groups()
    if alias is not None:
        try:
            check_alias(alias)  # MLflow's rule: no '.', ' ' or '@'
        except ValueError as exc:
            raise ConfigError(f"--model: {uri}: the alias {exc}") from None
    return name, alias, version


def resolve_model(uri: str, tracking_uri: str | None = None) -> ModelRef:
    """A checkpoint folder or Hub id as it is; a registry URI (a fine-tuned subject, see
    `subjectforge finetune`) pinned to a version now, so an alias that moves during a run cannot
    mix two versions in one output folder. ConfigError names a model that does not resolve."""
    if not uri.startswith(REGISTRY_SCHEME):
        return ModelRef(uri=uri, path=uri)
    from pipeline import tracking

    name, alias, version = parse_registry_uri(uri)
    try:
        version = tracking.registered_version(tracking.resolve_tracking_uri(tracking_uri), name, alias, version)
    except tracking.RegistryError as exc:
        raise tracking.RegistryError(f"--model: {exc}") from None
    return ModelRef(uri=uri, path=f"{REGISTRY_SCHEME}{name}/{version}", registered_name=name, registered_version=version)


def fetch_registered(ref: ModelRef, out: Path, tracking_uri: str | None = None) -> tuple[ModelRef, SubjectSpec]:
    """Download a registered subject, and its base when that is registered too, into
    `out/model/` (once: a rerun finds them there), and point `ref` at the local folders.

    The files go to the output folder rather than a temporary one because every generator actor
    loads them, and on a cluster `out` is the storage all nodes see.
    """
    from pipeline import tracking
    from pipeline.model.checkpoint import MODEL_INDEX
    from pipeline.model.subject import SUBJECT_FILE, SubjectSpec

    uri = tracking.resolve_tracking_uri(tracking_uri)
    try:
        root = _download_once(uri, str(ref.registered_name), str(ref.registered_version), out / MODEL_DIR / "subject")
        found = sorted(root.rglob(SUBJECT_FILE))
        if not found:
            raise ConfigError(f"--model {ref.uri} is not a fine-tuned subject (no {SUBJECT_FILE} in its files)")
        spec = SubjectSpec.read(found[0].parent)
        base = spec.base
        if base.startswith(REGISTRY_SCHEME):
            name, alias, version = parse_registry_uri(base)
            version = tracking.registered_version(uri, name, alias, version)
            base_root = _download_once(uri, name, version, out / MODEL_DIR / "base")
            indexes = sorted(base_root.rglob(MODEL_INDEX), key=lambda p: len(p.parts))
            if not indexes:
                raise ConfigError(f"the base of {ref.uri}, {base}, is not a BLIP-Diffusion checkpoint (no {MODEL_INDEX})")
            base = str(indexes[0].parent)
    except tracking.RegistryError as exc:
        raise tracking.RegistryError(f"--model: {exc}") from None
    return replace(ref, path=base, subject=str(found[0].parent)), spec


def _download_once(uri: str, name: str, version: str, dst: Path) -> Path:
    """`dst` holding registered version `name` `version`: fetched beside it, then renamed into
    place, so a `dst` that exists is complete."""
    from pipeline import tracking

    if not dst.is_dir():
        partial = dst.with_name(dst.name + ".partial")
        remove_tree(partial, dst.parent)
        tracking.download_model_version(uri, name, version, partial)
        partial.rename(dst)
        log.info("downloaded models:/%s/%s to %s", name, version, dst)
    return dst


def _check_model(ref: ModelRef) -> None:
    from pipeline.hub import require_model
    from pipeline.model.checkpoint import MODEL_INDEX, CheckpointError, check_layout

    local = Path(ref.path).expanduser()
    if local.exists() or ref.path.startswith((".", "/", "~")):
        try:
            check_layout(local)
        except CheckpointError as exc:
            raise CheckpointError(f"--model: {exc}") from None
    else:
        require_model("blip_diffusion", ref.path, marker=MODEL_INDEX)


def default_out(ref: ModelRef) -> Path:
    """subjectforge-eval/<model name>: a Hub id's owner--name, a folder's own name, a registered
    model's NAME-vVERSION."""
    local = Path(ref.path).expanduser()
    if ref.registered_name is not None:
        name = f"{ref.registered_name}-v{ref.registered_version}"
    else:
        name = local.resolve().name if local.exists() else ref.path.replace("/", "--")
    return Path(DEFAULT_OUT_ROOT) / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) or "model")


def _check_fingerprint(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix images made with other settings into this run's folder."""
    path = out / FINGERPRINT_FILE
    if path.exists() or path.is_symlink():
        before = _read_fingerprint(path)
        changed = sorted(k for k in fingerprint.keys() | before.keys() if fingerprint.get(k) != before.get(k))
        if changed:
            details = "; ".join(f"{k}: {before.get(k)!r} there, {fingerprint.get(k)!r} now" for k in changed)
            raise ConfigError(
                f"{out} holds images made with other settings ({details}). "
                "Pass another --out, or delete the folder to start over."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")


def _read_fingerprint(path: Path) -> dict[str, Any]:
    """The settings a previous run recorded; ConfigError naming the file when it is not a JSON
    object in a regular file (a run killed while writing it left it cut short; reading or writing
    a FIFO waits forever)."""
    try:
        if not path.is_file():
            raise ValueError("not a regular file")
        before = json.loads(path.read_text())
        if not isinstance(before, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(
            f"{path} cannot be read ({exc}): it records the settings of the images beside it; "
            "delete the folder to start over, or pass another --out"
        ) from None
    return before


def run_evaluation(config: Config, *, logger: ResultLogger | None = None, progress: bool = True) -> EvaluationResult:
    """Generate what is missing, score everything, write the report and log it (see module doc)."""
    from pipeline.hub import require_model
    from pipeline.raycluster import ensure_ray

    ev = config.evaluate
    ref = resolve_model(ev.model or config.model_path("blip_diffusion"), config.tracking.uri)
    # Absolute, because the actors that write and read the images have their own working directory.
    out = (Path(ev.out) if ev.out else default_out(ref)).expanduser().resolve()
    check_output_folder(out, "evaluate.out")
    subject_ids = ev.subjects
    model_id = ref.path if ref.registered_name is not None else plan.absolute_if_local(ref.path)
    if ref.registered_name is not None:
        ref, spec = fetch_registered(ref, out, config.tracking.uri)
        if subject_ids not in (None, [spec.subject_id]):
            raise ConfigError(f"--model {ref.uri} draws one subject, {spec.subject_id!r}, not {', '.join(subject_ids)}")
        subject_ids = [spec.subject_id]
        if ev.control and (not spec.traits.embeds or getattr(spec, "ti_property", None)):
            raise ConfigError(f"evaluate.control: a {spec.method} subject is drawn from text alone; the ControlNet table needs subject embeddings")
    bench = Path(ev.benchmark) if ev.benchmark else DEFAULT_BENCHMARK
    subjects = benchmark.load_subjects(
        ev.photos or DEFAULT_PHOTOS, benchmark.read_class_table(bench / benchmark.SUBJECTS_FILE), subject_ids
    )
    if ev.prompts:
        shared = benchmark.read_prompts(ev.prompts)
        prompts_for = {s.subject_id: shared for s in subjects}
    else:
        lists = {live: benchmark.read_prompts(bench / name) for live, name in ((False, benchmark.OBJECT_PROMPTS_FILE), (True, benchmark.LIVE_PROMPTS_FILE))}
        prompts_for = {s.subject_id: lists[s.live] for s in subjects}
    _check_model(ref)
    require_model("dino", config.model_path("dino"))
    require_model("clip", config.model_path("clip"))

    settings = plan.generation_settings(config)
    settings.pop("batch_size")  # changes the pixels only by float rounding
    _check_fingerprint(out, {"model": model_id, "photos": str(Path(ev.photos or DEFAULT_PHOTOS).resolve()), **settings})
    (out / report.GRIDS_DIR).mkdir(parents=True, exist_ok=True)

    tasks = benchmark.build_tasks(subjects, prompts_for, ev.images_per_prompt)
    missing = [t for t in tasks if not (out / t.path).is_file()]
    log.info("%d images for %d subjects; %d on disk, %d to generate in %s", len(tasks), len(subjects), len(tasks) - len(missing), len(missing), out)
    ensure_ray(config.ray)
    photos = {s.subject_id: list(s.photos) for s in subjects}
    generated = plan.generate_images(missing, photos, config, plan.absolute_if_local(ref.path), str(out), ref.subject, progress=progress)
    still_missing = [t.path for t in tasks if not (out / t.path).is_file()]
    if still_missing:
        raise RuntimeError(f"{len(still_missing)} images were not written, e.g. {still_missing[0]}")
    rows = plan.score_images(tasks, photos, config, str(out), progress=progress)
    per_subject, overall = summarize_scores(rows)
    control = _score_with_control(config, ref, tasks, photos, out, progress) if ev.control else None

    info = {
        "model": ref.uri if ref.registered_name is None else f"{ref.uri} (version {ref.registered_version})",
        "profile": config.profile,
        "subjects": len(subjects),
        "prompts": ev.prompts or f"{bench} (object / live lists)",
        "images_per_prompt": ev.images_per_prompt,
        "images": len(tasks),
        "steps": config.generate.steps,
        "guidance_scale": config.generate.guidance_scale,
        "resolution": f"{config.generate.width}x{config.generate.height}",
        "dino": config.model_path("dino"),
        "clip": config.model_path("clip"),
    }
    if control is not None:
        scores = ", ".join(f"{metric} {value:.4f}" for metric, value in control.items())
        info["with ControlNet"] = f"{scores} (canny maps of the real photos; tables in {CONTROL_DIR}/)"
    report.write_image_scores(out / report.IMAGES_CSV, rows)
    report.write_subject_scores(out / report.SCORES_CSV, per_subject, overall, Counter(r["subject_id"] for r in rows))
    (out / report.SUMMARY_MD).write_text(report.summary_markdown(per_subject, overall, info, tiny=config.profile == "tiny"))
    for subject in subjects:
        subject_tasks = [t for t in tasks if t.subject_id == subject.subject_id]
        prompt_rows: dict[str, list] = {}
        for t in subject_tasks:
            prompt_rows.setdefault(t.prompt, []).append(load_rgb(out / t.path))
        grid = report.make_subject_grid([load_rgb(p) for p in subject.photos], list(prompt_rows.values()), ev.thumbnail)
        grid.save(out / report.GRIDS_DIR / f"{subject.subject_id}.png")
    (out / CONFIG_FILE).write_text(yaml.safe_dump({"run": info}, sort_keys=False) + dump_config(config))

    result = EvaluationResult(out, ref, per_subject, overall, rows, generated, len(tasks) - len(missing), info, control=control)
    if logger is not None:
        result.mlflow_run_id = logger(result, config)
    return result


def _score_with_control(
    config: Config, ref: ModelRef, tasks: list[benchmark.ImageTask], photos: dict[str, list[str]], out: Path, progress: bool
) -> dict[str, float]:
    """evaluate.control: the same images again, each steered by the canny ControlNet on the edges
    of one of its subject's real photos, under out/control/ with their own tables; returns the
    overall scores."""
    folder = out / CONTROL_DIR
    control = plan.control_settings(config)
    _check_fingerprint(folder, control)
    missing = [t for t in tasks if not (folder / t.path).is_file()]
    log.info("with ControlNet %s: %d images, %d to generate", control["controlnet"], len(tasks), len(missing))
    plan.generate_images(missing, photos, config, plan.absolute_if_local(ref.path), str(folder), ref.subject,
                         progress=progress, control=control)
    rows = plan.score_images(tasks, photos, config, str(folder), progress=progress)
    per_subject, overall = summarize_scores(rows)
    report.write_image_scores(folder / report.IMAGES_CSV, rows)
    report.write_subject_scores(folder / report.SCORES_CSV, per_subject, overall, Counter(r["subject_id"] for r in rows))
    return overall


def log_to_mlflow(result: EvaluationResult, config: Config) -> str:
    """The evaluation as an MLflow run (the `tracking:` settings), through pipeline/tracking.py.

    The run is named eval-<output folder name>, so a rerun (which resumes in that folder) logs
    into the same run. It gets the resolved config as params; the overall scores (`dino`,
    `clip_i`, `clip_t`) and per subject (`dino/<subject>`, ...) as metrics; the tables, summary,
    settings and grids as artifacts (not the images themselves). A registered model version is
    linked both ways: the run is tagged with its name and version, and the version with the
    scores (`eval.dino`, ...) and the run id (`eval.run_id`).
    """
    from pipeline import tracking

    uri = tracking.resolve_tracking_uri(config.tracking.uri)
    ref = result.model
    tags = {"subjectforge.job": "evaluate", "subjectforge.model": ref.uri, "git_commit": tracking.git_commit()}
    if ref.registered_name is not None:
        tags |= {"subjectforge.model_name": ref.registered_name, "subjectforge.model_version": str(ref.registered_version)}
    run_name = f"eval-{result.out.name}"
    with tracking.open_run(config.tracking, run_name, tags) as run_id:  # FAILED if logging fails
        tracking.log_params(uri, run_id, tracking.flatten(config.model_dump(mode="json")))
        per_subject = {f"{m}/{s}": v for s, scores in result.per_subject.items() for m, v in scores.items()}
        control = {f"control/{m}": v for m, v in (result.control or {}).items()}
        tracking.log_metrics(uri, run_id, {**result.overall, **per_subject, **control}, step=0)
        if result.control is not None:
            tracking.log_artifacts(uri, run_id, result.out / CONTROL_DIR / report.SCORES_CSV, CONTROL_DIR)
        for name in (report.SCORES_CSV, report.IMAGES_CSV, report.SUMMARY_MD, CONFIG_FILE, FINGERPRINT_FILE):
            tracking.log_artifacts(uri, run_id, result.out / name)
        tracking.log_artifacts(uri, run_id, result.out / report.GRIDS_DIR, report.GRIDS_DIR)
        if ref.registered_name is not None:
            scores = {f"eval.{m}": f"{v:.4f}" for m, v in result.overall.items()}
            tracking.set_model_version_tags(
                uri, ref.registered_name, str(ref.registered_version), {**scores, "eval.run_id": run_id, "eval.images": str(len(result.images))}
            )
    log.info("MLflow: evaluation run %s (%s) at %s", run_id, run_name, uri)
    return run_id
