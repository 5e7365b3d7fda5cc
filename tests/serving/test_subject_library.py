"""pipeline/serving/subjects.py SubjectLibrary without a registry: what a registered version
that cannot be drawn costs the replica when it is asked for again and again."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import pipeline.serving.subjects as subjects
from pipeline.serving.subjects import RegisteredSubject, SubjectLibrary, SubjectUnusable


def counted_fetch(monkeypatch, answer):
    """Replace the registry download with `answer(name, version)`; the list of its calls."""
    calls = []

    def fetch(uri, name, version):
        calls.append((name, version))
        return answer(name, version)

    monkeypatch.setattr(subjects, "_fetch", fetch)
    return calls


def not_a_subject(name, version):
    raise SubjectUnusable(f"models:/{name}/{version} is not a fine-tuned subject (no subject.json in its artifacts)")


def full_unet(name, version):
    spec = SimpleNamespace(method="blipd", category="dog")
    return RegisteredSubject(f"{name}/{version}", name, version, spec, None, None, {"w": torch.zeros(1000)}, None)


@pytest.mark.parametrize("answer, words", [(not_a_subject, "not a fine-tuned subject"), (full_unet, "full_unet_budget_gb")])
def test_a_version_that_cannot_be_drawn_is_downloaded_once(monkeypatch, answer, words):
    # Each request for a registered model that is no subject (a base model of several GB in the
    # same registry), or for a full UNet past the budget, downloaded the whole version again.
    calls = counted_fetch(monkeypatch, answer)
    library = SubjectLibrary("sqlite:///unused.db", max_subjects=4, full_budget_bytes=100)
    for _ in range(3):
        with pytest.raises(SubjectUnusable, match=words):
            library.load("subjectforge-base", "1")
    assert calls == [("subjectforge-base", "1")]
    assert library._loading == {}  # no lock left behind per refused version
