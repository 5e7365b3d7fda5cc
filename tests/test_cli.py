"""The command line as a user meets it: exit codes, messages, the demo."""

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from tests.imagefiles import broken_files, make_source

ROOT = Path(__file__).resolve().parent.parent


def test_invalid_config_exits_2_naming_the_key(tmp_path, capsys):
    code = main(["data", "build", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--set", "data.trimap.lowx=1"])
    assert code == 2
    assert "data.trimap.lowx" in capsys.readouterr().err


def test_missing_source_exits_2(tmp_path, capsys):
    code = main(["data", "build", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "source folder not found" in capsys.readouterr().err


def test_missing_backgrounds_exit_2(tmp_path, capsys):
    src = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=1)
    code = main(["data", "build", "--source", str(src), "--out", str(tmp_path / "o"), "--backgrounds", str(tmp_path / "none")])
    assert code == 2
    assert "data.backgrounds" in capsys.readouterr().err


def test_reject_fraction_above_limit_exits_1(ray_local, tmp_path, capsys):
    src = make_source(tmp_path / "src", {"cat": "cat"}, sample=False)
    for name, data in broken_files().values():
        (src / "cat" / name).write_bytes(data)
    code = main(["data", "build", "--source", str(src), "--out", str(tmp_path / "o"), "--no-progress", "--profile", "tiny"])
    assert code == 1
    err = capsys.readouterr().err
    assert "6 of 6 inputs rejected" in err and "max_reject_fraction" in err


def test_demo_runs_the_whole_mission_offline_and_a_rerun_reuses_it(ray_local, tmp_path, capsys, monkeypatch):
    import base64
    import io

    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from pipeline.model import BlipDiffusion

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The demo's embedded defaults, less the denoising steps of its images (the pretraining
    # samples, the fine-tune's validation images, the generated image): nothing here asserts on
    # their pixels, and each step is a UNet call on CPU in both runs.
    smaller = ["data.decode.size=64", "train.samples.steps=2", "finetune.validation_steps=2", "generate.steps=2"]
    argv = ["demo", "--out", str(tmp_path), *(arg for key in smaller for arg in ("--set", key))]
    # The first run as a user's terminal shows it: its own Ray, stdout and stderr in the order written.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_DATA_DISABLE_PROGRESS_BARS")}
    first = subprocess.run(
        [sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500,
    )  # fmt: skip
    out = first.stdout
    assert first.returncode == 0, out[-3000:]
    # Workers' output stays in Ray's logs, linked from the run folder, and the summary comes last.
    assert "pid=" not in out and "Running Dataset train" not in out, out
    assert len(out.splitlines()) < 150, out
    summary = out[out.index("subjectforge demo: done") :].splitlines()[1:]
    assert summary and all(line.startswith(("  ", "note: ")) for line in summary), summary
    assert out.count("note: the tiny profile") == 1, out  # the demo's note, not its generate step's again
    assert f"Ray logs        {tmp_path / 'ray-logs'}" in out
    worker_logs = [p.read_text(errors="replace") for p in (tmp_path / "ray-logs").glob("worker-*.err")]
    assert any("step 10/10" in text for text in worker_logs)
    counts = re.search(r"inputs 41 = accepted (\d+) \+ rejected (\d+); rows (\d+)", out)
    assert counts and int(counts[1]) + int(counts[2]) == 41 and int(counts[3]) == 2 * int(counts[1])  # 2 composites a photo
    assert "time per stage" in out and "subjectforge demo: done" in out

    # Every artifact the summary names exists and reopens.
    assert Image.open(tmp_path / "contact_sheet.png").width == 4 * 160
    checkpoint = tmp_path / "runs" / "pretrain-v0001" / "step-0000010"
    assert f"{checkpoint} (step 10" in out
    BlipDiffusion.from_pretrained(checkpoint / "model")
    subject = tmp_path / "subjects" / "dog-lora"
    assert {p.name for p in subject.iterdir()} == {"subject.json", "subject_embeds.safetensors", "lora.safetensors"}
    assert Image.open(tmp_path / "generated" / "image_000.png").size == (64, 64)

    # The registry in the demo's own store, artifacts beside it: the base and the subject on it.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert f"mlflow ui --backend-store-uri {uri}" in out and "http://127.0.0.1:5000/#/models/subjectforge-dog/versions/1" in out
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("subjectforge-dog", "candidate")
    assert str(version.version) == "1" and version.tags["base_model"] == "models:/subjectforge-base/1" and version.tags["step"] == "5"
    assert client.get_run(version.run_id).info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert client.get_model_version("subjectforge-base", "1").tags["step"] == "10"
    # ... and loads by alias the way a user loads it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model("models:/subjectforge-dog@candidate")
    [image] = model.predict(pd.DataFrame([{"prompt": "on the beach", "seed": 0, "steps": 2}])).image
    assert Image.open(io.BytesIO(base64.b64decode(image))).size == (64, 64)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    # A rerun reuses everything: no new dataset version, runs resumed at their last step, the same registered versions.
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "nothing changed" in out and f"{checkpoint} (step 10" in out
    # ... and says it processed nothing: the version's build figures are labelled as that build's.
    assert "processed 0 photos" in out and "reused: this run processed 0 photos" in out
    assert not re.search(r"^\s*processed [1-9]", out, re.M) and "that build processed 41" in out
    assert "registered subjectforge-base version 1" in out and "registered subjectforge-dog version 1, alias candidate" in out
    assert [str(v.version) for v in client.search_model_versions("name = 'subjectforge-dog'")] == ["1"]
    # --data-only is the old quick demo: the dataset and its contact sheet, no training.
    assert main([*argv, "--data-only"]) == 0
    out = capsys.readouterr().out
    assert "contact sheet:" in out and "pretraining" not in out


def test_unloadable_model_exits_2_before_any_worker(tmp_path, capsys):
    src = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=1)
    args = ["data", "build", "--source", str(src), "--out", str(tmp_path / "o"), "--set", f"models.clipseg={tmp_path}/nothing"]
    assert main(args) == 2
    assert "models.clipseg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- test-command -->\s*```(?:bash|sh)?\n(.+?)\n```", readme, re.S)
    assert match, "README must mark its test command with <!-- test-command -->"
    command = match.group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text()


def test_console_script_is_installed():
    exe = shutil.which("subjectforge")
    assert exe, "pip install -e . should install the subjectforge script"
    result = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "data" in result.stdout and "demo" in result.stdout


def test_profile_help_names_the_real_default(capsys):
    from pipeline.config import Config

    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert Config().profile == "real"
    assert "Default: real" in help_text and "default: tiny" not in help_text


def _commands_with_profile(parser, path=()):
    """(command words, its parser) of every command and data subcommand that takes --profile."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands_with_profile(sub, (*path, name))
    if any("--profile" in action.option_strings for action in parser._actions):
        yield path, parser


def test_every_help_states_the_profile_a_run_gets_without_the_flag():
    from pipeline.cli import build_parser, resolve_config

    commands = dict(_commands_with_profile(build_parser()))
    assert ("demo",) in commands and ("data", "build") in commands
    for words, parser in commands.items():
        help_text = " ".join(parser.format_help().split())
        expected = "tiny" if words == ("demo",) else "real"
        assert f"Default: {expected}" in help_text, words
    assert resolve_config(build_parser().parse_args(["demo"])).profile == "tiny"


@pytest.mark.parametrize("where", ["driver", "ray-task"])
def test_a_full_disk_exits_1_with_the_reason_not_a_stack_trace(tmp_path, capsys, monkeypatch, where):
    # A dataset folder on a disk that fills midway: the build removes its staging and fails.
    import errno

    from ray.exceptions import RayTaskError

    from pipeline.commands import data

    full = OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")
    if where == "ray-task":  # Ray Data's write task fails on a worker: the driver gets this
        full = RayTaskError("Write", "Traceback (most recent call last): ...", full).as_instanceof_cause()

    def fills(args, config):
        raise full

    monkeypatch.setattr(data, "run", fills)
    code = main(["data", "build", "--source", str(tmp_path), "--out", str(tmp_path / "o")])
    assert code == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
