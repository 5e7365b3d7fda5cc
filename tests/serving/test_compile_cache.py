"""serve.compile_cache: a replica points Inductor's and Triton's caches at the configured folder
before it compiles (so a restarted or added replica reuses the generated code), says so in
/healthz, and a folder that is not local is a config error naming the key."""

from __future__ import annotations

import os

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.model import BlipDiffusion
from pipeline.serving import app

CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _server(tmp_path, monkeypatch, *overrides: str):
    """A SubjectServer on the tiny model with serve.compile; its compile records the cache
    folders it would write to instead of compiling, and the warm-up and holding its graphs are skipped."""
    seen: list[dict[str, str | None]] = []
    monkeypatch.setattr(BlipDiffusion, "compile_for_inference", lambda self, **_: seen.append({v: os.environ.get(v) for v in CACHE_VARS}))
    monkeypatch.setattr(app, "warm_up", lambda *a, **k: None)
    monkeypatch.setattr(app, "hold_compiled_graphs", lambda: None)  # process-wide: it would reach later tests
    for var in CACHE_VARS:
        monkeypatch.setenv(var, str(tmp_path / "torch-default"))
    config = load_config(overrides=["profile=tiny", "serve.compile=true", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides])
    return app.SubjectServer(config), seen


def test_the_replica_compiles_with_the_caches_in_the_configured_folder(tmp_path, monkeypatch):
    server, seen = _server(tmp_path, monkeypatch, f"serve.compile_cache={tmp_path / 'volume' / 'serve'}")
    folder = str((tmp_path / "volume" / "serve").resolve())
    assert seen == [{"TORCHINDUCTOR_CACHE_DIR": folder, "TRITON_CACHE_DIR": f"{folder}/triton"}]
    assert os.path.isdir(folder)
    health = server._health()["compile_cache"]
    assert health["folder"] == folder


def test_without_a_folder_the_replica_keeps_torchs_own_caches(tmp_path, monkeypatch):
    server, seen = _server(tmp_path, monkeypatch)
    default = str(tmp_path / "torch-default")
    assert seen == [{"TORCHINDUCTOR_CACHE_DIR": default, "TRITON_CACHE_DIR": default}]
    assert server._health()["compile_cache"]["folder"] is None


@pytest.mark.parametrize("value", ["s3://bucket/compile-cache", "gs://bucket/cache"])
def test_a_compile_cache_that_is_not_a_local_folder_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"serve.*compile_cache must be a local folder"):
        load_config(overrides=["profile=tiny", f"serve.compile_cache={value}"])
