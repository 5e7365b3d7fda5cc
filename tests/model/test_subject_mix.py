"""Mixing subject embeddings with weights (`mix_subjects`, `generate --subject`), tiny profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.model.blip_diffusion import mix_subjects

BASE = ["generate", "--profile", "tiny", "--prompt", "on the grass", "--steps", "2", "--height", "64", "--width", "64"]
BASE += ["--seed", "5", "--dtype", "float32", "--device", "cpu"]


def _photo(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_weights_are_scaled_to_sum_one():
    a, b = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    torch.testing.assert_close(mix_subjects([a, b], [0.7, 0.3]), 0.7 * a + 0.3 * b)
    torch.testing.assert_close(mix_subjects([a, b], [7, 3]), mix_subjects([a, b], [0.7, 0.3]))
    assert torch.equal(mix_subjects([a, a], [0.5, 0.5]), a)


@pytest.mark.parametrize("weights", [[0.5, -0.5], [0.0, 0.0], [-1.0, 0.2], [float("nan"), 1.0]])
def test_weights_without_a_positive_sum_are_refused(weights):
    a = torch.randn(1, 16, 32)
    with pytest.raises(ValueError, match="positive"):
        mix_subjects([a, a], weights)


def test_mix_of_a_subject_with_itself_equals_the_subject(tmp_path):
    photo = _photo(tmp_path / "dog.png", 0)
    assert main([*BASE, "--subject-image", photo, "--category", "dog", "--out", str(tmp_path / "alone")]) == 0
    mix = ["--subject-image", photo, "--category", "dog", "--subject", "dog=0.5", "--subject", f"dog:{photo}=0.5"]
    assert main([*BASE, *mix, "--out", str(tmp_path / "mix")]) == 0
    other = ["--subject", f"dog:{photo}=0.6", "--subject", f"cat:{_photo(tmp_path / 'cat.png', 1)}=0.4"]
    assert main([*BASE, *other, "--out", str(tmp_path / "other")]) == 0
    alone, mixed = (np.asarray(Image.open(tmp_path / d / "image_000.png")) for d in ("alone", "mix"))
    np.testing.assert_array_equal(mixed, alone)
    assert np.abs(np.asarray(Image.open(tmp_path / "other" / "image_000.png")).astype(int) - alone).max() > 0


def test_bad_subject_mixes_exit_2(tmp_path, capsys):
    photo = _photo(tmp_path / "dog.png", 0)
    out = ["--out", str(tmp_path / "o")]
    assert main([*BASE, *out, "--subject", f"dog:{photo}=0.5", "--subject", f"cat:{photo}=-0.5"]) == 2
    assert "positive" in capsys.readouterr().err
    assert main([*BASE, *out, "--subject", f"dog:{photo}=lots"]) == 2
    assert "'lots' is not a number" in capsys.readouterr().err
    assert main([*BASE, *out, "--subject", "dog=1"]) == 2
    assert "give its photos" in capsys.readouterr().err
    assert main([*BASE, *out, "--subject", f"dog:{photo}", "--subject", f"cat:{photo}", "--prompt", "a [dog] and a [horse]"]) == 2
    assert "[horse], which is not given" in capsys.readouterr().err
    assert main([*BASE, *out, "--subject", f"dog:{photo}", "--subject", f"cat:{photo}", "--prompt", "a [dog] on the grass"]) == 2
    assert "'cat' is given but no prompt names it" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("weights", [["1e308", "1e308"], ["1e300", "-1e300", "1"]])
def test_mix_weights_the_server_refuses_exit_2_not_a_blank_subject(tmp_path, capsys, weights):
    # 1e308 + 1e308 is inf, so each part weighed 0; [1e300, -1e300, 1] scaled a subject to inf
    # and made a NaN one: both were drawn (exit 0) as a black image.
    photo = _photo(tmp_path / "dog.png", 0)
    mix = [arg for w in weights for arg in ("--subject", f"dog:{photo}={w}")]
    assert main([*BASE, *mix, "--out", str(tmp_path / "o")]) == 2
    assert "--subject: the weights must add up to a positive number" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _image(folder):
    return np.asarray(Image.open(folder / "image_000.png"))


def test_a_slot_named_by_the_category_draws_the_subject_as_without_slots(tmp_path):
    photo, cat = _photo(tmp_path / "dog.png", 0), _photo(tmp_path / "cat.png", 1)
    subject = ["--subject-image", photo, "--category", "dog"]
    assert main([*BASE, *subject, "--out", str(tmp_path / "plain")]) == 0
    assert main([*BASE, *subject, "--prompt", "a [dog] on the grass", "--out", str(tmp_path / "slot")]) == 0
    np.testing.assert_array_equal(_image(tmp_path / "slot"), _image(tmp_path / "plain"))
    two = ["--prompt", "a [dog] next to a [cat]", "--subject", f"dog:{photo}", "--subject", f"cat:{cat}"]
    swapped = ["--prompt", "a [dog] next to a [cat]", "--subject", f"dog:{cat}", "--subject", f"cat:{photo}"]
    assert main([*BASE, *two, "--out", str(tmp_path / "two")]) == 0
    assert main([*BASE, *swapped, "--out", str(tmp_path / "swapped")]) == 0
    assert np.abs(_image(tmp_path / "two").astype(int) - _image(tmp_path / "swapped")).max() > 0


def test_a_registered_subject_mixes_by_its_embeddings(tmp_path, capsys):
    from tests.serve_subjects import make_subject, register_subject

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_subject(uri, make_subject(tmp_path / "tea", "textual-inversion", 9, category="teapot"), "sf-tea")
    registry = ["--set", f"tracking.uri={uri}"]
    assert main([*BASE, *registry, "--model", "models:/sf-tea@champion", "--out", str(tmp_path / "alone")]) == 0
    mix = ["--subject", "models:/sf-tea@champion=0.5", "--subject", "models:/sf-tea/1=0.5"]
    assert main([*BASE, *registry, *mix, "--out", str(tmp_path / "mix")]) == 0
    np.testing.assert_array_equal(_image(tmp_path / "mix"), _image(tmp_path / "alone"))
    slot = ["--subject", "models:/sf-tea@champion", "--subject", f"dog:{_photo(tmp_path / 'dog.png', 0)}"]
    assert main([*BASE, *registry, *slot, "--prompt", "a [dog] beside a [teapot]", "--out", str(tmp_path / "slots")]) == 0
    assert main([*BASE, *registry, "--subject", "models:/sf-nobody@champion=1", "--out", str(tmp_path / "o")]) == 2
    assert "sf-nobody" in capsys.readouterr().err and not (tmp_path / "o").exists()
