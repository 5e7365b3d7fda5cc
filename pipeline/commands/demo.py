"""`subjectforge demo`: the whole mission, offline, on the bundled sample with the tiny models.

Build the dataset -> pretrain a few steps on 2 gloo workers -> fine-tune one subject from the
pretrained base -> register it in MLflow -> load it by alias and generate -> print where
everything is. Each step calls the function its own command calls (`data build`, `pretrain`,
`finetune`, `generate --model models:/...`); only the defaults below are the demo's. Outputs
the user did not place elsewhere go under --out, MLflow included (a SQLite store there unless
`tracking.uri` or $MLFLOW_TRACKING_URI names one). A rerun reuses everything: the dataset is
unchanged, the pretraining and fine-tuning runs resume at their last step and keep their
registered versions, and only the image is made again.

What the terminal shows: one line per phase, the dataset's summary, and the mission's summary
last. The workers' own output (Ray Train's and its datasets' progress, every training step's
line) stays in Ray's log files, linked from OUT/ray-logs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote

import ray
from ray.data import DataContext

from pipeline.config import BUNDLED_DATASETS_DIR, Config, ConfigError
from pipeline.data.build import build_dataset
from pipeline.data.report import format_summary, make_contact_sheet
from pipeline.paths import folder_flag
from pipeline.raycluster import ensure_ray

SAMPLE = BUNDLED_DATASETS_DIR / "dreambench-mini"
PROMPT = "on the beach"
RAY_LOGS = "ray-logs"  # under --out: a link to Ray's log folder

# Embedded defaults, layered under --config/--set: offline on the shipped tiny models, and
# small enough for a laptop: 64 px crops, 10 pretraining steps on 2 workers that together
# reserve half a CPU (plus one for the data tasks), 5 LoRA steps.
DEMO_DEFAULTS = {
    "profile": "tiny",
    "data": {"decode": {"size": 256}},
    "train": {
        "workers": 2, "cpus_per_worker": 0.25, "data_cpus": 0.5, "steps": 10, "batch_size": 2, "resolution": 64,
        "lr": 1e-4, "warmup_steps": 0, "log_every": 2, "checkpoint_every": 10, "keep_checkpoints": 1,
        "samples": {"every": 10, "steps": 10},
    },
    "finetune": {"subject_id": "dog", "method": "lora", "steps": 5},
    "generate": {"steps": 10},
    "tracking": {"system_metrics": False},
}


def add_arguments(parser: argparse.ArgumentParser, add_common) -> None:
    parser.add_argument("--out", default="subjectforge-demo", type=folder_flag, help="where the demo writes (default: ./subjectforge-demo)")
    parser.add_argument("--source", default=str(SAMPLE), help="photos to use (default: the bundled DreamBench sample)")
    parser.add_argument("--data-only", action="store_true", help="only build the dataset and its contact sheet (seconds)")
    parser.set_defaults(_config_base=DEMO_DEFAULTS)  # before add_common, whose --profile help reads it
    add_common(parser)


def run(args: argparse.Namespace, config: Config) -> int:
    if not Path(args.source).is_dir():
        raise ConfigError(f"demo source {args.source} not found (the bundled sample ships in a clone of the repo)")
    out = Path(args.out).resolve()
    # Checked before the build; the build itself logs where the user's settings say (the
    # demo's own store only holds what it trains).
    mission = None if args.data_only else place_outputs(config, out)
    own_ray = mission is not None and ensure_ray(mission.ray, logs=out / RAY_LOGS)
    if mission is not None:
        # One bar for the build: Ray Data's bar of each operator is the data engineer's view.
        DataContext.get_current().enable_operator_progress_bars = False
        print(f"Ray's logs (every worker's output, each training step's line): {out / RAY_LOGS}")
    result = build_dataset(args.source, out / "dataset", config, incremental=True)
    reused = result.status == "unchanged"
    print()
    if reused:
        print(result.message)
        print(format_summary(result.manifest, result.path, reused=True))
    else:
        print(format_summary(result.manifest, result.path))
        print(result.message)
    if result.status == "failed":
        print(f"subjectforge: error: {result.message}", file=sys.stderr)
        return 1
    sheet = make_contact_sheet(result.path, out / "contact_sheet.png")
    if args.data_only:
        print(f"\ndataset: {result.path} (latest: {out / 'dataset' / 'latest'})")
        if sheet:
            print(f"contact sheet: {sheet}")
        return 0
    return _train_register_generate(mission, out, result.path, sheet, reused, own_ray)


def place_outputs(config: Config, out: Path) -> Config:
    """The config with the demo's dataset as training data and every output the user did not
    place elsewhere (runs, subjects, the MLflow store) under `out`."""
    from pipeline import tracking

    tree = config.model_dump(mode="json")
    dataset = str(out / "dataset")
    tree["train"]["data"] = tree["finetune"]["subject"] = dataset
    if "storage_path" not in config.train.model_fields_set:
        tree["train"]["storage_path"] = str(out / "runs")
    if "out" not in config.finetune.model_fields_set:
        tree["finetune"]["out"] = str(out / "subjects")
    for key, on in (("tracking.enabled", config.tracking.enabled), ("finetune.register_model", config.finetune.register_model)):
        if not on:
            raise ConfigError(f"{key}: the demo registers its subject in MLflow and loads it back by alias")
    if not (config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        out.mkdir(parents=True, exist_ok=True)
        tree["tracking"]["uri"] = f"sqlite:///{out / 'mlflow.db'}"
        # A new experiment's artifacts would go to ./mlruns of wherever the demo ran: keep them beside the store.
        tracking.ensure_experiment(tree["tracking"]["uri"], config.tracking.experiment, (out / "mlartifacts").as_uri())
    return Config.model_validate(tree)


def _train_register_generate(
    config: Config, out: Path, dataset: Path, sheet: Path | None, dataset_reused: bool, own_ray: bool
) -> int:
    from ray.train import TrainingFailedError

    from pipeline.commands import generate
    from pipeline.train.finetune import SubjectError, finetune_subject
    from pipeline.train.trainer import run_training

    ft = config.finetune
    try:
        print(f"\npretraining {config.train.steps} steps on {config.train.workers} workers ...")
        base = run_training(config)
        print(f"pretrained to step {base.step}" + (f", loss {base.metrics['loss']:.4f}" if "loss" in base.metrics else ""))
        base_ref = f"models:/{config.train.register_as}/{base.model_version}" if base.model_version else f"{base.checkpoint}/model"
        print(f"fine-tuning {ft.subject_id} ({ft.method}, {ft.steps} steps) from {base_ref} ...")
        subject = finetune_subject(config.model_copy(update={"finetune": ft.model_copy(update={"base": base_ref})}))
        print(f"fine-tuned {ft.subject_id}: " + ("reused the registered version" if subject.reused else f"step {subject.step}"))
    except (SubjectError, TrainingFailedError) as exc:
        print(f"subjectforge: error: {exc}", file=sys.stderr)
        return 1
    model_uri = f"models:/{subject.model_name}@{ft.alias}"
    images = out / "generated"
    parser = argparse.ArgumentParser(prog="subjectforge generate")
    generate.add_arguments(parser, lambda _: None)
    parser.set_defaults(_profile_note=False)  # the demo's summary ends with its own
    # `generate`'s --model flag is the config key models.blip_diffusion (generate.FLAGS), which
    # cli.main applies; called directly, the demo sets it.
    config = config.model_copy(update={"models": config.models.model_copy(update={"blip_diffusion": model_uri})})
    code = generate.run(parser.parse_args(["--model", model_uri, "--prompt", PROMPT, "--out", str(images)]), config)
    if code:
        return code

    if own_ray:
        ray.shutdown()  # its raylet's warnings would otherwise print after the summary
    uri = config.tracking.uri
    ui = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    print("\nsubjectforge demo: done")
    reuse = "; reused: nothing changed in the source" if dataset_reused else ""
    print(f"  dataset         {dataset} ({out / 'dataset' / 'latest'}{reuse}); contact sheet {sheet}")
    print(f"  pretrained      {base.checkpoint} (step {base.step}; MLflow run {base.mlflow_run_id})")
    if base.model_version:
        print(f"                  registered {config.train.register_as} version {base.model_version}")
    print(f"  fine-tuned      {subject.artifact} ({subject.method}, step {subject.step}, {subject.artifact_bytes / 2**10:.0f} KiB)")
    reuse = " (reused: the registry held this fine-tune)" if subject.reused else ""
    print(f"                  registered {subject.model_name} version {subject.model_version}, alias {ft.alias}{reuse}")
    print(f"  generated       {images / 'image_000.png'} from {model_uri}, prompt {PROMPT!r}")
    print(f"  MLflow          {uri}")
    if ui != uri:
        print(f"                  look: mlflow ui --backend-store-uri {uri}   (then open the link below)")
    print(f"                  {ui}/#/models/{quote(subject.model_name)}/versions/{subject.model_version}")
    print(f"  Ray logs        {out / RAY_LOGS} (every worker's output, each training step's line)")
    print(f"  load it         MLFLOW_TRACKING_URI={uri} python -c \"import mlflow; mlflow.pyfunc.load_model('{model_uri}')\"")
    if config.profile == "tiny":
        print("note: the tiny profile uses random-weight models: every step runs for real, and the images are noise.")
    return 0
