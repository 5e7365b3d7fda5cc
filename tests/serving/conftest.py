"""Fixtures the serving tests share across modules: what several modules built each for itself,
built once a session."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.serve_subjects import make_subject


@pytest.fixture(scope="session")
def lora_folders(tmp_path_factory) -> dict[str, Path]:
    """LoRA subject folders a, b, c and d (seeds 1 to 4), the same in every module that draws
    them (test_engine, test_engine_conditioning, test_lora_slots, test_warmup). Tests only read
    them: each module reads its own subjects from them (read_subject)."""
    root = tmp_path_factory.mktemp("lora-subjects")
    return {name: make_subject(root / name, "lora", seed) for seed, name in enumerate("abcd", 1)}


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory) -> Callable[[Path], str]:
    """A function that gives `folder` an empty SQLite MLflow store of its own (folder/mlflow.db)
    and returns its tracking URI. A new store runs MLflow's schema migrations (seconds of CPU);
    each store here is a copy of one migrated once a session, the same tables a fresh one has."""
    from mlflow import MlflowClient

    template = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{template}"
    MlflowClient(uri, registry_uri=uri).search_registered_models()  # creates and migrates the tables

    def fresh(folder: Path) -> str:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return fresh
