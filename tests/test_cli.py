"""The command line as a user meets it: exit codes, messages, the demo."""

import re
import shutil
import subprocess
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


@pytest.mark.slow
def test_reject_fraction_above_limit_exits_1(ray_local, tmp_path, capsys):
    src = make_source(tmp_path / "src", {"cat": "cat"}, sample=False)
    for name, data in broken_files().values():
        (src / "cat" / name).write_bytes(data)
    code = main(["data", "build", "--source", str(src), "--out", str(tmp_path / "o"), "--no-progress", "--profile", "tiny"])
    assert code == 1
    err = capsys.readouterr().err
    assert "6 of 6 inputs rejected" in err and "max_reject_fraction" in err


@pytest.mark.slow
def test_demo_runs_offline_and_writes_a_contact_sheet(ray_local, tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path), "--set", "data.decode.size=64"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"inputs 41 = accepted \d+ \+ rejected \d+", out)
    assert "contact sheet:" in out and "time per stage" in out
    sheet = Image.open(tmp_path / "contact_sheet.png")
    assert sheet.width == 4 * 160 and sheet.height > 160
    # A second demo run finds nothing new.
    assert main(["demo", "--out", str(tmp_path), "--set", "data.decode.size=64"]) == 0
    assert "nothing changed" in capsys.readouterr().out


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
