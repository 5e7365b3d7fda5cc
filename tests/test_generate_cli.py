"""`subjectforge generate` on the tiny profile, offline: PNGs, a grid and the settings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.cli import COMMANDS, main
from pipeline.config import PROFILE_MODELS
from tests.imagefiles import png_header_only


def _photo(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_generate_writes_images_and_grid(tmp_path, capsys):
    assert "generate" in [name for name, _, _ in COMMANDS]
    photos = [_photo(tmp_path / "a.png"), _photo(tmp_path / "b.jpg")]
    out = tmp_path / "out"
    args = ["generate", "--subject-image", *map(str, photos), "--category", "dog", "--prompt", "on the beach"]
    args += ["-n", "3", "--out", str(out), "--steps", "2", "--height", "64", "--width", "48", "--profile", "tiny"]
    assert main(args) == 0
    pngs = sorted(out.glob("image_*.png"))
    assert [p.name for p in pngs] == ["image_000.png", "image_001.png", "image_002.png"]
    assert Image.open(pngs[0]).size == (48, 64)
    assert Image.open(out / "grid.png").size == (2 * 48, 2 * 64)  # 3 images tile as 2x2
    settings = yaml.safe_load((out / "generate.yaml").read_text())
    assert settings["generate"]["steps"] == 2 and settings["run"]["category"] == "dog"
    assert "grid.png" in capsys.readouterr().out


def test_generate_bad_input_exits_2(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    base = ["generate", "--profile", "tiny", "--category", "dog", "--out", str(tmp_path / "o"), "--steps", "1"]
    base += ["--height", "64", "--width", "64"]
    assert main([*base, "--subject-image", str(notes), "--prompt", "on grass"]) == 2
    assert "not a readable image" in capsys.readouterr().err
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(30000, 30000))  # past PIL's own 179 MP guard
    assert main([*base, "--subject-image", str(bomb), "--prompt", "on grass"]) == 2
    assert "bomb.png) is not a readable image" in capsys.readouterr().err
    assert main([*base, "--subject-image", str(_photo(tmp_path / "a.png")), "--prompt", " "]) == 2
    assert "prompt: must not be empty" in capsys.readouterr().err
    assert main([*base, "--subject-image", str(tmp_path / "a.png"), "--prompt", "x", "--height", "60"]) == 2
    assert "generate.height" in capsys.readouterr().err
    assert main([*base, "--subject-image", str(tmp_path / "a.png"), "--prompt", "x", "--model", str(tmp_path)]) == 2
    assert "model_index.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--target-category", " "], "--target-category: must not be empty"),
        (["--target-category", "caf\udce9"], "--target-category: not UTF-8 text"),  # a Latin-1 terminal's bytes
        (["--negative-prompt", "caf\udce9"], "generate.negative_prompt: not UTF-8 text"),  # a config key
        (["--device", "bogus"], "--device 'bogus': not a device"),
        (["--device", "cpu:abc"], "--device 'cpu:abc': not a device"),
        (["--device", "cuda:0"], "--device 'cuda:0': no such CUDA device"),
        (["--device", "meta"], "--device 'meta': not a device to draw on"),  # torch names it, it holds no data
        (["--device", "xpu"], "--device 'xpu': not a device to draw on"),
        (["--device", "mps"], "--device 'mps': this machine has no MPS device"),
    ],
    ids=["blank-target-category", "latin1-target-category", "latin1-negative-prompt", "unknown-device", "bad-index",
         "absent-cuda", "meta-device", "other-backend", "absent-mps"],
)
def test_bad_category_or_device_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch, flags, message):
    import torch

    from pipeline.model import BlipDiffusion

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # also on a machine with GPUs
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)  # also on a Mac
    monkeypatch.setattr(BlipDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", str(_photo(tmp_path / "a.png"))]
    assert main([*args, "--prompt", "x", "--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("batch", ["0", "-3"])
def test_batch_size_below_one_exits_2(tmp_path, capsys, batch):
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", str(_photo(tmp_path / "a.png"))]
    args += ["--prompt", "x", "--steps", "1", "--height", "64", "--width", "64", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as info:
        main([*args, "--batch-size", batch])
    assert info.value.code == 2
    assert f"--batch-size: must be at least 1, got {batch}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_an_out_that_cannot_be_a_folder_exits_2_before_any_model_work(tmp_path, capsys, monkeypatch, out):
    from pipeline.model import BlipDiffusion

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setattr(BlipDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", str(_photo(tmp_path / "a.png"))]
    assert main([*args, "--prompt", "x", "--out", str(tmp_path / out)]) == 2
    assert f"--out {tmp_path / out}: {tmp_path / 'file'} is not a folder" in capsys.readouterr().err


def test_a_bug_in_generation_keeps_its_stack_trace(tmp_path, monkeypatch):
    # Only the errors a user can fix exit 2: a ValueError from inside the model is a bug.
    from pipeline.model import BlipDiffusion

    def broken(self, *args, **kwargs):
        raise ValueError("an internal shape check")

    monkeypatch.setattr(BlipDiffusion, "generate", broken)
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", str(_photo(tmp_path / "a.png"))]
    with pytest.raises(ValueError, match="an internal shape check"):
        main([*args, "--prompt", "x", "--steps", "1", "--height", "64", "--width", "64", "--out", str(tmp_path / "o")])


def test_generate_yaml_records_the_size_the_images_were_drawn_at(tmp_path):
    # A registered subject draws at its training resolution (64 px here) while generate.height
    # and generate.width still hold their 512 px defaults.
    import argparse

    from pipeline.commands.generate import _write
    from pipeline.config import load_config

    args = argparse.Namespace(out=str(tmp_path), subject_image=None, style_image=None, subject=None, category=None,
                              target_category=None, prompt="p", num_images=1)
    _write(args, load_config(overrides=["profile=tiny"]), [Image.new("RGB", (64, 48))], 0.1, "cpu", "float32")
    settings = yaml.safe_load((tmp_path / "generate.yaml").read_text())
    assert (settings["generate"]["width"], settings["generate"]["height"]) == (64, 48)


def test_a_second_run_into_one_out_leaves_only_its_own_images(tmp_path):
    """Before: -n 3 then -n 1 into one --out left image_001/002.png of the first run beside the
    second's grid.png and generate.yaml. Only what the last record lists goes: files generate
    did not write stay, even when a hand-edited record names them."""
    out = tmp_path / "out"
    args = ["generate", "--subject-image", str(_photo(tmp_path / "a.png")), "--category", "dog", "--prompt", "on the beach"]
    args += ["--out", str(out), "--steps", "1", "--height", "32", "--width", "32", "--profile", "tiny", "--device", "cpu"]
    assert main([*args, "-n", "3"]) == 0
    record = yaml.safe_load((out / "generate.yaml").read_text())
    assert record["run"]["files"] == ["image_000.png", "image_001.png", "image_002.png", "grid.png"]
    (out / "notes.txt").write_text("mine")
    (out / "image_009.png").write_bytes(b"mine too")  # not written by generate
    record["run"]["files"] += ["notes.txt", "../a.png"]
    (out / "generate.yaml").write_text(yaml.safe_dump(record))
    assert main([*args, "-n", "1"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["generate.yaml", "grid.png", "image_000.png", "image_009.png", "notes.txt"]
    assert (tmp_path / "a.png").is_file()


def test_a_link_planted_in_out_is_replaced_not_written_through(tmp_path, capsys):
    """image_000.png or generate.yaml linked to a file outside --out: the run wrote the image
    into that file. The link itself is replaced; a FIFO or folder there is an error, not a hang."""
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("not yours")
    out = tmp_path / "out"
    out.mkdir()
    (out / "image_000.png").symlink_to(elsewhere)
    (out / "generate.yaml").symlink_to(elsewhere)
    args = ["generate", "--subject-image", str(_photo(tmp_path / "a.png")), "--category", "dog", "--prompt", "on the beach"]
    args += ["--out", str(out), "--steps", "1", "--height", "32", "--width", "32", "--profile", "tiny", "--device", "cpu"]
    assert main(args) == 0
    assert elsewhere.read_text() == "not yours"
    assert not (out / "image_000.png").is_symlink() and Image.open(out / "image_000.png").size == (32, 32)
    assert not (out / "generate.yaml").is_symlink()
    (out / "grid.png").unlink()
    os.mkfifo(out / "grid.png")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "grid.png" in err and "not a regular file" in err


@pytest.mark.parametrize("flag", ["--model", "--subject"])
def test_a_registry_alias_mlflow_refuses_exits_2_saying_so(tmp_path, capsys, monkeypatch, flag):
    # It was "models:/x@a@b not found in the registry ...: Invalid alias name", or a missing store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'absent.db'}")
    args = ["generate", "--profile", "tiny", "--prompt", "x", "--out", str(tmp_path / "o"), flag, "models:/x@a@b"]
    if flag == "--subject":
        args += ["--height", "64", "--width", "64"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "models:/x@a@b: the alias 'a@b' is not an alias name" in err and "not found" not in err
    assert not (tmp_path / "absent.db").exists()


@pytest.mark.parametrize("out", ["/proc/subjectforge-out", "/sys/subjectforge-out/sub"])
def test_an_out_that_cannot_be_written_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch, out):
    # os.access lets root write in /proc and /sys: the folder was refused only after denoising.
    from pipeline.model import BlipDiffusion

    monkeypatch.setattr(BlipDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", str(_photo(tmp_path / "a.png"))]
    assert main([*args, "--prompt", "x", "--out", out]) == 2
    assert f"--out {out}: cannot write in {Path(out).parts[0]}{Path(out).parts[1]}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--category", "--target-category"])
def test_a_category_longer_than_the_server_takes_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch, flag):
    # The server refused a category over MAX_CATEGORY_CHARS; the CLI took any length.
    from pipeline.config import MAX_CATEGORY_CHARS
    from pipeline.model import BlipDiffusion

    monkeypatch.setattr(BlipDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", str(_photo(tmp_path / "a.png"))]
    long = "d" * (MAX_CATEGORY_CHARS + 1)
    assert main([*args, "--prompt", "x", "--out", str(tmp_path / "o"), flag, long]) == 2
    assert f"{flag}: a class noun of at most {MAX_CATEGORY_CHARS} characters, got {MAX_CATEGORY_CHARS + 1}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_category_as_long_as_the_server_takes_passes_the_check():
    from pipeline.commands.generate import check_text_flags
    from pipeline.config import MAX_CATEGORY_CHARS

    check_text_flags({"--category": "d" * MAX_CATEGORY_CHARS, "--style-category": "d" * MAX_CATEGORY_CHARS})


@pytest.mark.parametrize("entry", ["{long}:{photo}", "{long}=0.5", "dog=heavy", " :{photo}"])
def test_a_bad_subject_entry_exits_2_before_the_model_loads(tmp_path, capsys, monkeypatch, entry):
    # --subject CATEGORY:IMG took a class noun of any length, and was parsed only after the model loaded.
    from pipeline.config import MAX_CATEGORY_CHARS
    from pipeline.model import BlipDiffusion

    monkeypatch.setattr(BlipDiffusion, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    photo = _photo(tmp_path / "a.png")
    text = entry.format(long="d" * (MAX_CATEGORY_CHARS + 1), photo=photo)
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", str(photo), "--subject", text]
    assert main([*args, "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "--subject" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["generate", "edit"])
def test_a_qformer_tokenizer_that_is_a_file_exits_2(tmp_path, capsys, command):
    # Before: transformers read the file as a vocabulary, and its bytes ended the run in a
    # tokenizers stack trace ("stream did not contain valid UTF-8") after the model loaded.
    photo = str(_photo(tmp_path / "a.png"))
    args = [command, "--profile", "tiny", "--category", "dog", "--subject-image", photo, "--prompt", "a dog on grass"]
    if command == "edit":
        args += ["--replace", "dog"]
    with pytest.raises(SystemExit) as info:
        main([*args, "--out", str(tmp_path / "o"), "--qformer-tokenizer", photo])
    assert info.value.code == 2
    assert f"argument --qformer-tokenizer: {photo} is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("vocab", [os.urandom(4096), b"\n" * 64, b"[UNK]\n\xff\xfe broken\n"])
def test_a_qformer_tokenizer_with_a_garbage_vocab_exits_2_naming_the_folder(tmp_path, capsys, vocab):
    # Before: a vocab.txt of random bytes ended in the tokenizers library's stack trace
    # ("Error while initializing WordPiece").
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(vocab)
    photo = str(_photo(tmp_path / "a.png"))
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", photo, "--prompt", "a dog"]
    args += ["--steps", "1", "--height", "64", "--width", "64", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "o"), "--qformer-tokenizer", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "Q-Former's BERT tokenizer" in err and str(folder) in err
    assert not list((tmp_path / "o").glob("*.png"))


def test_a_model_whose_clip_vocabulary_is_garbage_exits_2_naming_it(tmp_path, capsys):
    # The CLIP tokenizer's files go through the same tokenizers library as the Q-Former's.
    model = tmp_path / "model"
    shutil.copytree(PROFILE_MODELS["tiny"]["blip_diffusion"], model)
    (model / "tokenizer" / "merges.txt").write_bytes(os.urandom(4096))
    photo = str(_photo(tmp_path / "a.png"))
    args = ["generate", "--profile", "tiny", "--category", "dog", "--subject-image", photo, "--prompt", "a dog"]
    args += ["--steps", "1", "--height", "64", "--width", "64", "--device", "cpu", "--model", str(model)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert f"cannot load the CLIP tokenizer from {model / 'tokenizer'}" in capsys.readouterr().err


@pytest.mark.parametrize("record", ["generate.yaml", "edit.yaml"])
def test_a_previous_record_that_is_a_fifo_is_refused_not_read(tmp_path, record):
    # Reading a FIFO waits for a writer forever: generate and edit hung after denoising when
    # --out held one under their record's name.
    from pipeline.commands.generate import previous_run
    from pipeline.errors import UserError

    os.mkfifo(tmp_path / record)
    with pytest.raises(UserError, match=f"{record} is not a regular file: remove it or choose another --out"):
        previous_run(tmp_path, record)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / record).symlink_to(tmp_path / record)  # a link is replaced by output_file, never read
    assert previous_run(tmp_path / "linked", record) == {}


@pytest.mark.parametrize(
    "text",
    [
        "\n".join(["l0: &l0 [a, a, a, a, a, a, a, a, a, a]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 8)])
        + "\nrun:\n  files: *l7\n",
        "run:\n  files: " + "[" * 5000 + "]" * 5000 + "\n",
    ],
    ids=["aliases", "nested"],
)
def test_a_previous_record_too_big_to_walk_is_not_read(tmp_path, text):
    # A record whose `files` expand to 10**8 names (a few lines of YAML anchors) kept the next
    # run's stale-image cleanup busy for minutes; one nested 5,000 deep was a RecursionError.
    from pipeline.commands.generate import previous_run

    (tmp_path / "generate.yaml").write_text(text)
    assert not previous_run(tmp_path, "generate.yaml")  # not ==: pytest's diff of a failure would walk it
