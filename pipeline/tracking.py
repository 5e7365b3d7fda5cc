"""MLflow, and only here: runs, params, metrics, the dataset input, images, the model registry.

The driver of a job creates (or, for a rerun, reopens) the run and registers the model; rank 0
of the training workers logs into that run by id. Every function takes the tracking URI
explicitly and talks through an `MlflowClient`, so no process relies on MLflow's global
"active run", and worker processes (whose working directory is not the driver's) write to the
same store.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import REPO_DIR, TrackingConfig, check_alias
from pipeline.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"  # MLflow 3's own default
RUN_NAME_TAG = "subjectforge.run_name"  # the Ray Train run name; a rerun with it reopens the run
_PARAM_LIMIT = 6000  # MLflow's longest param value


def resolve_tracking_uri(setting: str | None, local_store: bool = True) -> str | None:
    """The tracking URI, by one policy: `tracking.uri`, else $MLFLOW_TRACKING_URI, else the local
    store sqlite:///mlruns.db. A relative SQLite path is made absolute against the current
    directory, so workers find the same file. A job that may run anywhere and can run untracked
    (a data build) passes `local_store=False` and gets None rather than leave an mlruns.db
    wherever it ran. Whether a job tracks at all is `tracking.enabled`, checked by its caller:
    a registry URI (models:/...) is read through this store even with tracking off."""
    uri = setting or os.environ.get("MLFLOW_TRACKING_URI") or (DEFAULT_TRACKING_URI if local_store else None)
    prefix = "sqlite:///"
    if uri and uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _like(value: str) -> str:
    """A LIKE pattern, quoted for a filter string, that matches `value` (and maybe others).

    MLflow's filter grammar strips a string literal's outer quotes and has no escape for a quote
    inside it (a trailing backslash also ends the parse), so a name such as o'neil cannot be
    written as an `=` literal. Each of those characters becomes `_` (any one character) instead,
    and callers keep only the exact matches.
    """
    return "'" + re.sub(r"['\"\\]", "_", value) + "'"


def _run_named(client: Any, experiment_id: str, run_name: str) -> str | None:
    """The id of the newest run in the experiment tagged with `run_name`, or None."""
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` LIKE {_like(run_name)}",
            order_by=["attributes.start_time DESC"], max_results=100, page_token=token,
        )
        for run in page:
            if run.data.tags.get(RUN_NAME_TAG) == run_name:
                return run.info.run_id
        token = page.token
        if not token:
            return None


def _model_versions(client: Any, name: str) -> list[Any]:
    """Every version of registered model `name` (none when it is not registered)."""
    return [v for v in client.search_model_versions(f"name LIKE {_like(name)}") if v.name == name]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-5}} -> {"train.lr": "1e-05"}: a nested config as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:_PARAM_LIMIT]
    return flat


def git_commit(repo: Path = REPO_DIR) -> str:
    """The checkout's HEAD commit, with "-dirty" when tracked files differ; "unknown" outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


# ---------------------------------------------------------------------------------------------
# Driver side


def start_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """The id of the MLflow run for Ray Train run `run_name`: the existing one (a rerun resumes
    it, status back to RUNNING) or a new one in `experiment`."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run_id = _run_named(client, experiment_id, run_name)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: reopened run %s (%s) in %s", run_id, run_name, uri)
    else:
        run_id = client.create_run(experiment_id, run_name=run_name, tags={RUN_NAME_TAG: run_name}).info.run_id
        log.info("MLflow: run %s (%s) in experiment %r at %s", run_id, run_name, experiment, uri)
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, value)
    return run_id


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """status: FINISHED, FAILED or KILLED."""
    _client(uri).set_terminated(run_id, status=status)


@contextmanager
def open_run(settings: TrackingConfig, name: str, tags: Mapping[str, str]) -> Iterator[str | None]:
    """The block inside the MLflow run `name` of `settings.experiment` (start_run: a rerun reopens
    it); yields its id, or None with tracking off, where the block runs untracked. The run ends
    FINISHED, or FAILED when the block raises (the exception propagates)."""
    if not settings.enabled:
        yield None
        return
    uri = resolve_tracking_uri(settings.uri)
    run_id = start_run(uri, settings.experiment, name, tags)
    try:
        yield run_id
    except BaseException:
        finish_run(uri, run_id, "FAILED")
        raise
    finish_run(uri, run_id)


def ensure_experiment(uri: str, experiment: str, artifact_location: str) -> None:
    """Create `experiment` with its artifacts at `artifact_location` (a URI) unless it exists.
    Without this, a local store puts a new experiment's artifacts in ./mlruns of the process
    that created it."""
    client = _client(uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifact_location)


def register_model(uri: str, run_id: str, folder: Path, name: str, tags: Mapping[str, str], artifact_path: str = "model") -> str:
    """Log `folder` as the run's `model` artifact and register it as a new version of `name`,
    tagged with `tags` (dataset version and digest, git commit, step). Returns the version.

    The artifact is the `save_pretrained` layout: `mlflow.artifacts.download_artifacts(
    "models:/<name>/<version>")` gives a folder `BlipDiffusion.from_pretrained` loads.
    """
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    client.log_artifacts(run_id, str(folder), artifact_path)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags=dict(tags))
    log.info("MLflow: registered %s version %s from run %s", name, version.version, run_id)
    return str(version.version)


def find_model_version(uri: str, name: str, tags: Mapping[str, str]) -> str | None:
    """The newest version of `name` whose tags include all of `tags` (so a rerun does not
    register twice); None when there is none or `name` is not registered. Any other failure
    (a server that stopped answering) is raised: taken as "not registered", it would make the
    caller train and register a duplicate."""
    from mlflow.exceptions import MlflowException

    try:
        versions = _model_versions(_client(uri), name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if all(version.tags.get(k) == v for k, v in tags.items()):
            return str(version.version)
    return None


def model_version_info(uri: str, name: str, version: str) -> dict[str, Any]:
    """Tags and source run id of registered version `name` `version`."""
    found = _client(uri).get_model_version(name, version)
    return {"tags": dict(found.tags), "run_id": found.run_id}


# ---------------------------------------------------------------------------------------------
# Rank 0 of the training workers


def log_params(uri: str, run_id: str, params: Mapping[str, str]) -> None:
    """Log params not yet on the run. A rerun may change some (e.g. more steps): those keep
    their first value (MLflow params are immutable) and are listed in a warning."""
    from mlflow.entities import Param

    client = _client(uri)
    logged = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:
        log.warning("MLflow params keep their first values; changed in this rerun: %s", ", ".join(changed))
    new = [Param(k, v) for k, v in params.items() if k not in logged]
    for start in range(0, len(new), 100):  # log_batch takes at most 100 params
        client.log_batch(run_id, params=new[start : start + 100])


def last_metric_step(uri: str, run_id: str, key: str) -> int:
    """The highest step at which the run has metric `key`, or -1 when it has none."""
    return max((m.step for m in _client(uri).get_metric_history(run_id, key)), default=-1)


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    _client(uri).log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def log_dataset(
    uri: str, run_id: str, *, name: str, path: str, digest: str, version: str, rows: int,
    context: str = "training", extra_tags: Mapping[str, str] | None = None, **_: Any,
) -> None:
    """The dataset version as a run input (what `mlflow.log_input` records), with its manifest's
    digest, so `search_runs`/the UI show which data a model was trained on (context "training")
    or which version a refresh produced (context "refresh", with its parent in `extra_tags`)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import DatasetInput, InputTag

    source = resolve_dataset_source(path) if "://" in path else LocalArtifactDatasetSource(Path(path).resolve().as_uri())
    dataset = MetaDataset(source=source, name=f"{name}@{version}", digest=digest)
    tags = [InputTag("mlflow.data.context", context), InputTag("dataset_version", version), InputTag("rows", str(rows))]
    tags += [InputTag(k, v) for k, v in (extra_tags or {}).items()]
    client = _client(uri)
    already = client.get_run(run_id).inputs.dataset_inputs
    if any(d.dataset.digest == digest for d in already):
        return
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])


def log_image(uri: str, run_id: str, image: Any, key: str, step: int) -> None:
    _client(uri).log_image(run_id, image, key=key, step=step, synchronous=True)


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    _client(uri).set_tag(run_id, key, value)


def start_system_metrics(uri: str, run_id: str, interval_s: float = 10.0) -> Any:
    """Start MLflow's sampler of this node's CPU/memory/disk (GPU with pynvml); returns the
    monitor (call `.finish()`), or None where psutil is missing."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri, resume_logging=True)
    except ImportError as exc:
        log.warning("no system metrics: %s", exc)
        return None
    monitor.start()
    return monitor


# ---------------------------------------------------------------------------------------------
# Dataset builds (`subjectforge data build|refresh`)

DATA_ACTION_TAG = "subjectforge.data.action"  # build | refresh
DATA_STATUS_TAG = "subjectforge.data.status"  # built | unchanged | failed | error
NOTHING_NEW_TAG = "subjectforge.data.nothing_new"  # "true" when a refresh found nothing to do


class TrackingUnavailable(UserError, RuntimeError):
    """The configured tracking server does not answer."""


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingUnavailable unless an http(s) tracking server answers /health within
    `timeout_s`; local stores (sqlite, file) always pass. MLflow's own client would retry for
    minutes before failing, so a job checks this once before any work."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except (OSError, urllib.error.URLError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise TrackingUnavailable(f"MLflow tracking server {uri} does not answer ({problem})")


def reachable_uri(setting: str | None, optional: bool = False) -> str:
    """The tracking URI (resolve_tracking_uri) once its server answers. Every command that talks
    to MLflow calls this before any work: TrackingUnavailable (exit 2) in seconds instead of MLflow's
    minutes of retries. `optional`: the command can run without MLflow, and the message says how."""
    uri = resolve_tracking_uri(setting)
    try:
        check_reachable(uri)
    except TrackingUnavailable as exc:
        without = ", or run without MLflow: --set tracking.enabled=false" if optional else ""
        raise TrackingUnavailable(f"{exc}; set tracking.uri / $MLFLOW_TRACKING_URI to a live server{without}") from None
    return uri


def start_data_run(uri: str, experiment: str, run_name: str, action: str) -> str:
    """A new run (never a reopened one: each build or refresh is its own event) for a data job."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
    run_id = client.create_run(experiment_id, run_name=run_name, tags={DATA_ACTION_TAG: action}).info.run_id
    log.info("MLflow: data run %s (%s) in experiment %r at %s", run_id, run_name, experiment, uri)
    return run_id


def finish_data_run(
    uri: str, run_id: str, *, status: str, message: str, manifest: dict[str, Any] | None = None,
    manifest_path: Path | None = None, digest: str | None = None, nothing_new: bool = False,
) -> None:
    """Close a data run. `status`: built | unchanged | failed (the job's own check) | error (an
    exception). With a new version (`manifest` of status built or failed, and its `digest`) the
    version is the run's input dataset, tagged with its parent and counts, and the manifest is
    an artifact; "nothing new" is a tag and a metric (nothing_new = 1)."""
    import time

    from mlflow.entities import Metric

    client = _client(uri)
    client.set_tag(run_id, DATA_STATUS_TAG, status)
    client.set_tag(run_id, NOTHING_NEW_TAG, str(nothing_new).lower())
    client.set_tag(run_id, "subjectforge.data.message", message[:5000])
    counts = {"nothing_new": float(nothing_new)}
    if manifest is not None:
        client.set_tag(run_id, "dataset_version", str(manifest["version"]))
        client.set_tag(run_id, "parent_version", str(manifest.get("parent_version") or ""))
    if manifest is not None and not nothing_new:
        for key in ("inputs", "accepted", "rejected", "rows", "processed", "unchanged", "new", "changed", "removed", "wall_seconds"):
            counts[key] = float(manifest[key])
        counts["affected_subjects"] = float(len(manifest.get("affected_subjects", {})))
        log_dataset(
            uri, run_id, name=Path(manifest_path).parent.parent.name, path=str(Path(manifest_path).parent), digest=str(digest),
            version=str(manifest["version"]), rows=int(manifest["rows"]), context="refresh",
            extra_tags={"parent_version": str(manifest.get("parent_version") or ""), "accepted": str(manifest["accepted"]),
                        "rejected": str(manifest["rejected"]), "status": str(manifest["status"])},
        )
        client.log_artifact(run_id, str(manifest_path))
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in counts.items()])
    client.set_terminated(run_id, status="FINISHED" if status in ("built", "unchanged") else "FAILED")


# ---------------------------------------------------------------------------------------------
# Evaluation (`subjectforge evaluate`)


def log_artifacts(uri: str, run_id: str, path: Path, artifact_path: str | None = None) -> None:
    """Upload a file, or a folder's contents, into the run's artifacts (under `artifact_path`)."""
    client = _client(uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def set_model_version_tags(uri: str, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Tag registered model version `name` `version` (e.g. with evaluation scores and their run)."""
    client = _client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def registered_version(uri: str, name: str, alias: str | None = None, version: str | None = None) -> str:
    """The version of registered model `name` that `alias` points at now, or `version` once it
    is known to exist. A job reads an alias once, so it uses one version even if the alias moves.
    RegistryError names the model and the server when it does not resolve."""
    from mlflow.exceptions import MlflowException

    ref = f"models:/{name}@{alias}" if alias is not None else f"models:/{name}/{version}"
    _check_ref(ref, name, alias, version)
    client = _reading_client(uri, ref)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias is not None else client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise _registry_error(ref, uri, exc) from None
    return str(found.version)


def download_model_version(uri: str, name: str, version: str, dst: Path) -> Path:
    """The files of registered version `name` `version`, downloaded into folder `dst`."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    dst.mkdir(parents=True, exist_ok=True)
    try:
        source = _reading_client(uri, f"models:/{name}/{version}").get_model_version_download_uri(name, version)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=uri))
    except MlflowException as exc:
        raise _registry_error(f"models:/{name}/{version}", uri, exc) from None


# ---------------------------------------------------------------------------------------------
# Fine-tuned subjects: pyfunc models in the registry (`finetune`, `promote`, `generate --model`)

SUBJECT_ARTIFACT = "subject"  # the pyfunc's artifact key: the subject folder (pipeline/model/subject.py)
PYFUNC_FOLDER = "subject_model"  # where the pyfunc is logged in the run's artifacts


class RegistryError(UserError, LookupError):
    """A registry URI, model name, version or alias that does not resolve."""


class RegistryNotFound(RegistryError):
    """The registry answered, and holds no such model, version or alias (a server that did not
    answer is a plain RegistryError: a caller must not report it as an unknown model)."""


# What the registry answers for a model, version or alias it does not hold (a missing alias is
# INVALID_PARAMETER_VALUE); anything else, a server that stopped answering included, is not "not found".
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


# What MLflow's registry accepts (mlflow.utils.validation _validate_model_name; the alias rule,
# check_alias, is pipeline/config.py's, which the finetune.alias field uses); checked before a
# lookup, so a malformed alias or name is a bad input, not a model the registry does not hold.
def check_model_name(name: str) -> str:
    """`name` if the registry accepts it as a model name; ValueError saying why otherwise."""
    if not name.strip() or "/" in name or ":" in name:
        raise ValueError(f"{name[:80]!r} is not a registered model name: MLflow names are not blank and hold no '/' or ':'")
    return name


def check_version_number(version: str) -> str:
    """`version` if it is a registered version's number; ValueError otherwise."""
    if not (version.isascii() and version.isdigit()):
        raise ValueError(f"{version[:80]!r} is not a version number")
    return version


def _check_ref(ref: str, name: str, alias: str | None, version: str | None) -> None:
    """RegistryError naming `ref` and its part that the registry would refuse: a malformed
    alias came back from MLflow as INVALID_PARAMETER_VALUE, reported as a model not found."""
    for part, check, text in (("name", check_model_name, name), ("alias", check_alias, alias), ("version", check_version_number, version)):
        if text is None:
            continue
        try:
            check(str(text))
        except ValueError as exc:
            raise RegistryError(f"{ref}: the {part} {exc}") from None


def _registry_error(ref: str, uri: str, exc: Any) -> RegistryError:
    """The RegistryError for MlflowException `exc` of a lookup of `ref`."""
    if exc.error_code in _NOT_FOUND:
        return RegistryNotFound(f"{ref} not found in the registry at {uri}: {exc.message}")
    return RegistryError(f"{ref}: the registry at {uri} failed ({exc.error_code}): {exc.message}")


def _reading_client(uri: str, ref: str):
    """The client for a lookup of `ref` that only reads. A local SQLite store that does not
    exist holds no model, and opening it would create it (an mlruns.db left in the current
    folder by a mistyped models:/ URI), so that is RegistryNotFound without touching the disk."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists():
        raise RegistryNotFound(
            f"{ref} not found in the registry at {uri}: the file does not exist (set tracking.uri or $MLFLOW_TRACKING_URI to the registry)"
        )
    return _client(uri)


LIMITS_CONFIG_KEY = "serve_limits"  # the pyfunc's model_config key: serve.limits of the config that logged it
CONTROLNET_CONFIG_KEY = "controlnet"  # the canny ControlNet (id or folder) that draws rows with a control_image


def subject_signature() -> Any:
    """Output: one row per image (`prompt_index`, `image`: PNG bytes as base64 text, so the model
    server's JSON carries them). Input: one row per prompt, fields as in
    pipeline/serving/requests.py (`prompt`; optional `negative_prompt`, `num_images`, `seed`,
    `guidance_scale`, `steps`, `height`, `width`; a structure control `control_image`, `control`,
    `control_scale`, `control_start`, `control_end` as in pipeline/serving/controls.py; an edit `replace`, `edit_image` as in
    pipeline/serving/edits.py; a subject `mix` as in pipeline/serving/rows.py). The input has no MLflow schema on purpose:
    MLflow would cast 1.5 or true to a seed of 1 and drop unknown columns before `predict`
    saw them; `predict` checks the rows itself."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=None, outputs=Schema([ColSpec("long", "prompt_index"), ColSpec("string", "image")]))


def _make_subject_pyfunc() -> type:
    import mlflow.pyfunc

    class SubjectPyfunc(mlflow.pyfunc.PythonModel):
        """A fine-tuned subject on its base model: prompts in, base64 PNGs out (see subject_signature)."""

        def load_context(self, context: Any) -> None:
            import torch

            from pipeline.config import PROFILE_CONTROLNETS, ServeLimits
            from pipeline.model.subject import SubjectModel, SubjectSpec

            # A model logged before the limits were saved with it gets the default limits.
            self.limits = ServeLimits.model_validate((context.model_config or {}).get(LIMITS_CONFIG_KEY, {}))
            self.controlnet_path = (context.model_config or {}).get(CONTROLNET_CONFIG_KEY) or PROFILE_CONTROLNETS["real"]["canny"]
            self._controlnet = None  # loaded on the first row with a control_image
            folder = Path(context.artifacts[SUBJECT_ARTIFACT])
            base = SubjectSpec.read(folder).base
            if base.startswith("models:/"):  # the registered base: fetched from this process's tracking server
                base = str(download_model(resolve_tracking_uri(None), base))
            cuda = torch.cuda.is_available()
            self.subject = SubjectModel.load(
                folder, base, dtype=torch.float16 if cuda else torch.float32, device="cuda" if cuda else "cpu"
            )

        def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
            import torch
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

            from pipeline.config import DecodeConfig
            from pipeline.serving.edits import REPLACE_FIELD
            from pipeline.serving.engine import is_out_of_memory
            from pipeline.serving.requests import RequestError, records_from_frame
            from pipeline.serving.rows import validate_rows
            from pipeline.serving.subjects import MIX_FIELD

            # Every row is checked before any image is made. The scoring server answers an
            # MlflowException with INVALID_PARAMETER_VALUE as HTTP 400 with its message and no
            # stack trace (mlflow/pyfunc/scoring_server: invocations, _async_catch_mlflow_exception).
            try:
                if params:
                    raise RequestError("params", "are not used; give the fields in each row")
                rows = validate_rows(records_from_frame(model_input), self.limits, DecodeConfig())
                if self.subject.subject_embeds is None and any(row.control or row.edit for row in rows):
                    field = "control_image" if any(row.control for row in rows) else REPLACE_FIELD
                    raise RequestError(field, f"is not available for a {self.subject.spec.method} subject (it has no subject embeddings)")
                mixed = [index for index, row in enumerate(rows) if row.mix is not None]
                if mixed and (self.subject.subject_embeds is None or self.subject.spec.ti_property is not None):
                    # dreambooth has no embeddings; a textual inversion's are its learned word [S], (1, V, D)
                    raise RequestError(MIX_FIELD, f"a {self.subject.spec.method} subject has no subject embeddings to mix; "
                                       f"send the row without {MIX_FIELD} (row {mixed[0]})")
            except RequestError as exc:
                raise MlflowException(f"invalid request: {exc}", error_code=INVALID_PARAMETER_VALUE) from None
            try:
                return self._draw(rows)
            except Exception as exc:  # the scoring server answers any but an MlflowException as a 400 with its stack trace
                if not is_out_of_memory(exc):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                raise MlflowException("out of memory on the model server; retry, or ask for fewer or smaller images",
                                      error_code=TEMPORARILY_UNAVAILABLE) from None

        def _draw(self, rows: list[Any]) -> Any:
            """The output frame (see subject_signature) of checked rows (pipeline/serving/rows.py Row)."""
            import base64
            import io

            import pandas as pd
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            from pipeline.config import EditConfig
            from pipeline.model.editing import EditError
            from pipeline.serving.edits import REPLACE_FIELD, draw_edit

            out = []
            for index, (request, control, edit, mix) in enumerate(rows):
                subject = self._mixed(mix)
                if edit is not None:
                    size = subject.spec.resolution
                    try:  # the replaced word is located in the tokens before any step
                        images = [draw_edit(subject.model, edit, request, subject.subject_embeds, subject.spec.category,
                                            request.height or size, request.width or size, EditConfig())]
                    except EditError as exc:  # a word past the tokens left beside the subject's
                        raise MlflowException(f"invalid request: {REPLACE_FIELD}: {exc} (row {index})",
                                              error_code=INVALID_PARAMETER_VALUE) from None
                else:
                    images = subject.generate(**asdict(request), control=self._control(control, request))
                for image in images:
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    out.append({"prompt_index": index, "image": base64.b64encode(buffer.getvalue()).decode("ascii")})
            return pd.DataFrame(out, columns=["prompt_index", "image"])

        def _mixed(self, mix: Any) -> Any:
            """The SubjectModel a row draws: the model's own subject, or with a mix (a checked
            MixedSubject) the same model and UNet with the parts' weighted embeddings (1, Q, D),
            named by the first part's category, as serve and `generate --subject` mix them."""
            if mix is None:
                return self.subject
            from dataclasses import replace

            from pipeline.model.blip_diffusion import mix_subjects
            from pipeline.model.subject import SubjectModel
            from pipeline.serving.subjects import OwnSubject

            own, model = self.subject, self.subject.model
            embeds = [own.subject_embeds if isinstance(part, OwnSubject)
                      else model.encode_subject(list(part.images), part.category).to(own.subject_embeds)
                      for part in mix.parts]
            first = mix.parts[0]
            category = own.spec.category if isinstance(first, OwnSubject) else first.category
            return SubjectModel(model, replace(own.spec, category=category), mix_subjects(embeds, mix.weights))

        def _control(self, control: Any, request: Any) -> Any:
            """The model's Control of a row's checked control (None without one), at the row's size."""
            if control is None:
                return None
            from pipeline.model.control import Control, load_controlnet
            from pipeline.serving.controls import control_tensor

            model = self.subject.model
            if self._controlnet is None:
                self._controlnet = load_controlnet(self.controlnet_path, dtype=model.dtype, device=model.device, local_files_only=False)
            size = self.subject.spec.resolution
            image = control_tensor(control, model.image_processor, request.height or size, request.width or size)
            return Control(self._controlnet, image, control.scale, start=control.start, end=control.end)

    SubjectPyfunc.__module__ = __name__
    return SubjectPyfunc


_LAZY: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """`SubjectPyfunc` is built on first use, so importing this module does not import MLflow;
    pickle finds it here by name when a process loads the model."""
    if name == "SubjectPyfunc":
        if name not in _LAZY:
            _LAZY[name] = _make_subject_pyfunc()
            _LAZY[name].__qualname__ = name
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def log_subject_model(
    uri: str, run_id: str, folder: Path, name: str, tags: Mapping[str, str], alias: str | None, limits: Any = None,
    controlnet: str | None = None,
) -> str:
    """Save the subject in `folder` as a pyfunc (its files only, plus the base's reference in
    subject.json), log it into the run, register it as a new version of `name` with `tags`,
    and point `alias` at it. Returns the version. `limits` (a ServeLimits; None = the
    defaults) is saved with the model: whatever serves it refuses requests beyond them; so is
    `controlnet`, the canny ControlNet for rows with a control_image (None: the real profile's)."""
    import tempfile

    import mlflow.pyfunc

    from pipeline.config import ServeLimits

    limits = limits if limits is not None else ServeLimits()
    with tempfile.TemporaryDirectory(prefix="subjectforge-pyfunc-") as tmp:
        path = Path(tmp) / PYFUNC_FOLDER
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=__getattr__("SubjectPyfunc")(),
            artifacts={SUBJECT_ARTIFACT: str(folder)},
            signature=subject_signature(),
            model_config={LIMITS_CONFIG_KEY: limits.model_dump(), **({CONTROLNET_CONFIG_KEY: controlnet} if controlnet else {})},
            pip_requirements=["subjectforge"],
        )
        version = register_model(uri, run_id, path, name, tags, artifact_path=PYFUNC_FOLDER)
    if alias:
        set_alias(uri, name, alias, version)
    return version


def set_alias(uri: str, name: str, alias: str, version: str | None = None, from_alias: str | None = None) -> str:
    """Point `alias` of registered model `name` at `version`, else at the version `from_alias`
    names, else at the newest version; returns the version. RegistryError when none resolves."""
    from mlflow.exceptions import MlflowException

    client = _reading_client(uri, f"models:/{name}")  # the model must exist: never create a store to set an alias
    try:
        if version is None and from_alias is not None:
            version = str(client.get_model_version_by_alias(name, from_alias).version)
        elif version is None:
            versions = _model_versions(client, name)
            if not versions:
                raise RegistryError(f"registered model {name!r} has no versions at {uri}")
            version = str(max(int(v.version) for v in versions))
        client.get_model_version(name, version)
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        raise RegistryError(f"cannot set {name}@{alias} at {uri}: {exc.message}") from None
    log.info("MLflow: %s@%s -> version %s", name, alias, version)
    return version


def download_model(uri: str, model_uri: str) -> Path:
    """The files of registry URI `models:/NAME/VERSION` or `models:/NAME@ALIAS` in a local
    folder. RegistryError names the model and the server when it does not resolve."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    ref = model_uri[len("models:/") :] if model_uri.startswith("models:/") else ""
    name, sep, alias = ref.partition("@")
    if not sep:
        name, _, version = ref.rpartition("/")
    if not name or not (alias if sep else version):
        raise RegistryError(f"{model_uri!r} is not a registry URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
    _check_ref(model_uri, name, alias if sep else None, None if sep else version)
    client = _reading_client(uri, model_uri)
    try:
        version = str(client.get_model_version_by_alias(name, alias).version) if sep else version
        source = client.get_model_version_download_uri(name, version)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri))
    except MlflowException as exc:
        raise _registry_error(model_uri, uri, exc) from None


def subject_folder(uri: str, model_uri: str) -> Path:
    """The subject folder (subject.json and its tensors) of a registered subject model."""
    root = download_model(uri, model_uri)
    found = sorted(p.parent for p in root.glob("artifacts/*/subject.json"))
    if not found:
        raise RegistryError(f"{model_uri} is not a fine-tuned subject (no subject.json in its artifacts)")
    return found[0]


def registered_models(uri: str, prefix: str = "") -> list[dict[str, Any]]:
    """Registered models whose name starts with `prefix`, by name: [{"name", "aliases":
    {alias: version}, "latest_version"}] (what `subjectforge serve` lists at /v1/subjects)."""
    client = _client(uri)
    found, token = [], None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        for model in page:
            if model.name.startswith(prefix):
                versions = [int(v.version) for v in model.latest_versions or []]
                found.append({"name": model.name, "aliases": {k: str(v) for k, v in sorted((model.aliases or {}).items())},
                              "latest_version": str(max(versions)) if versions else None})
        token = page.token
        if not token:
            return sorted(found, key=lambda m: m["name"])
