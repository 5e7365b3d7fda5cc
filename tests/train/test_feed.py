"""The training feed's layout (pipeline/train/data.py): precomputed tensors as fixed-size binary
Parquet columns, collated into one tensor per column, in a seeded order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.train.data import FeedCollate, pack_tensor_columns, read_tensor_layout, repeat_passes
from stages.records import CATEGORY
from stages.train_inputs import CAPTION, IMAGE_FEATURES, LATENT_PARAMS


def _rows(n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        CATEGORY: np.array([f"subject-{i}" for i in range(n)], dtype=object),
        CAPTION: np.array([""] * n, dtype=object),
        LATENT_PARAMS: rng.standard_normal((n, 8, 4, 4), dtype=np.float32),
        IMAGE_FEATURES: rng.standard_normal((n, 5, 16), dtype=np.float32).astype(np.float16),
    }


def test_packed_rows_read_back_as_the_same_tensors(tmp_path):
    rows = _rows()
    pq.write_table(pack_tensor_columns(rows), tmp_path / "part.parquet", row_group_size=5)
    table = pq.read_table(tmp_path / "part.parquet")
    layout = read_tensor_layout(table.schema)
    assert layout == {LATENT_PARAMS: ("float32", (8, 4, 4)), IMAGE_FEATURES: ("float16", (5, 16))}
    # Several chunks, and a slice that starts mid-chunk: the rows land in one tensor in order.
    batch = FeedCollate(layout)(pa.concat_tables([table.slice(3, 4), table.slice(9, 3)]))
    index = [3, 4, 5, 6, 9, 10, 11]
    assert batch[CATEGORY] == [f"subject-{i}" for i in index]
    for name in (LATENT_PARAMS, IMAGE_FEATURES):
        assert batch[name].dtype == torch.from_numpy(rows[name]).dtype and batch[name].is_contiguous()
        np.testing.assert_array_equal(batch[name].numpy(), rows[name][index])
    # In-memory shards hand dicts of numpy arrays to the same collate.
    again = FeedCollate()({k: v[index] for k, v in rows.items()})
    assert again[CATEGORY] == batch[CATEGORY] and torch.equal(again[LATENT_PARAMS], batch[LATENT_PARAMS])


def test_the_feed_gives_every_row_once_per_pass_in_a_seeded_order(ray_local, tmp_path):
    import ray

    rows = _rows(24)
    pq.write_table(pack_tensor_columns(rows), tmp_path / "part.parquet", row_group_size=8)
    layout = read_tensor_layout(pq.read_schema(tmp_path / "part.parquet"))

    def epoch(seed: int) -> tuple[list[str], torch.Tensor]:
        ds = repeat_passes(ray.data.read_parquet(str(tmp_path / "part.parquet")), 2)  # as the trainer reads
        names, latents = [], []
        for batch in ds.iter_torch_batches(
            batch_size=4, collate_fn=FeedCollate(layout), local_shuffle_buffer_size=16, local_shuffle_seed=seed
        ):
            names += batch[CATEGORY]
            latents.append(batch[LATENT_PARAMS])
        return names, torch.cat(latents)

    names, latents = epoch(seed=7)
    assert sorted(names) == sorted(list(rows[CATEGORY]) * 2)  # every row once per pass
    for name, latent in zip(names, latents, strict=True):  # each row's tensors travel with it
        np.testing.assert_array_equal(latent.numpy(), rows[LATENT_PARAMS][int(name.split("-")[1])])
    assert epoch(seed=7)[0] == names  # the same seed, the same order
    assert names != list(rows[CATEGORY]) * 2  # and shuffled


def test_passes_per_epoch_are_the_planned_epochs_on_gpus_and_one_on_cpu():
    from pipeline.config import load_config
    from pipeline.train.data import MAX_PASSES, DatasetInfo, training_passes

    info = DatasetInfo(name="d", version="v0001", path="/d", digest="x", rows=100, files=[], subjects=[], has_caption=False)
    gpu = ["train.gpu=true", "train.batch_size=10", "train.workers=1", "train.grad_accum=1"]
    assert training_passes(info, load_config(overrides=[*gpu, "train.steps=25"])) == 3  # 2.5 epochs planned
    assert training_passes(info, load_config(overrides=[*gpu, "train.steps=1000"])) == MAX_PASSES
    assert training_passes(info, load_config(overrides=[*gpu, "train.steps=1"])) == 1
    # CPU runs keep one pass: a union's row order depends on which node finishes first.
    assert training_passes(info, load_config(overrides=["train.steps=1000", "train.batch_size=10"])) == 1


class _FakePlan:
    """Stands in for the encode plan: write_parquet appends a part of `rows` rows with a new
    name, as Ray Data's default SaveMode.APPEND does (the files already there stay)."""

    def __init__(self, rows: int):
        self.rows = rows

    def map_batches(self, *args, **kwargs):
        return self

    def write_parquet(self, path, **kwargs):
        import uuid
        from pathlib import Path

        ids = np.arange(self.rows)
        batch = {"category": np.array(["dog"] * self.rows, dtype=object), "latent_params": ids[:, None].astype(np.float32)}
        Path(path).mkdir(parents=True, exist_ok=True)
        pq.write_table(pack_tensor_columns(batch), Path(path) / f"{uuid.uuid4().hex}.parquet")


class _KilledPlan(_FakePlan):
    def write_parquet(self, path, **kwargs):
        super().write_parquet(path)
        raise KeyboardInterrupt  # the job dies after its first part


def test_a_precompute_killed_midway_leaves_no_rows_in_the_next_runs_cache(tmp_path, monkeypatch):
    # The killed run wrote some parts and no completion record. The rerun must not count them:
    # Ray Data appends, so the cache would hold those rows twice (and the arrays too).
    import ray.data

    from pipeline.config import load_config
    from pipeline.train import data as feed

    monkeypatch.setattr(ray.data, "read_parquet", lambda files, filesystem=None: list(files))
    monkeypatch.setattr(feed, "repeat_passes", lambda files, passes: files)
    config = load_config(None)
    info = feed.DatasetInfo(name="d", version="v0001", path=str(tmp_path), digest="0" * 16, rows=6, files=[], subjects=[], has_caption=False)

    with pytest.raises(KeyboardInterrupt):
        feed.precompute_inputs(_KilledPlan(4), info, config, str(tmp_path))
    files = feed.precompute_inputs(_FakePlan(6), info, config, str(tmp_path))
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 6
    arrays = np.load(f"{info.array_cache}/latent_params.npy")
    assert arrays.shape == (6, 1)
    # A third run reuses the completed cache as it is.
    assert feed.precompute_inputs(_FakePlan(6), info, config, str(tmp_path)) == files


def test_a_precompute_killed_while_writing_its_completion_record_is_made_again(tmp_path, monkeypatch):
    # The record is read now (it names the parts): a half-written one must never be in place.
    from types import SimpleNamespace

    import pyarrow.fs
    import ray.data

    from pipeline.config import load_config
    from pipeline.train import data as feed

    class _DiesInRecord:
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def open_output_stream(self, path):
            stream = self.fs.open_output_stream(path)
            stream.write(b'{"rows": 6, "ke')
            stream.close()
            raise KeyboardInterrupt  # killed midway through the record

    from_uri = pyarrow.fs.FileSystem.from_uri
    monkeypatch.setattr(ray.data, "read_parquet", lambda files, filesystem=None: list(files))
    monkeypatch.setattr(feed, "repeat_passes", lambda files, passes: files)
    config = load_config(None)
    info = feed.DatasetInfo(name="d", version="v0001", path=str(tmp_path), digest="0" * 16, rows=6, files=[], subjects=[], has_caption=False)
    def dying_from_uri(uri):
        fs, root = from_uri(uri)
        return _DiesInRecord(fs), root

    dying = SimpleNamespace(FileSystem=SimpleNamespace(from_uri=dying_from_uri), FileType=pyarrow.fs.FileType)
    with monkeypatch.context() as patch:
        patch.setattr(feed.pyarrow, "fs", dying)
        with pytest.raises(KeyboardInterrupt):
            feed.precompute_inputs(_FakePlan(6), info, config, str(tmp_path))
    files = feed.precompute_inputs(_FakePlan(6), info, config, str(tmp_path))
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == 6


def test_a_cache_holding_other_rows_than_the_dataset_is_refused(tmp_path, monkeypatch):
    # One an older release made after a precompute killed midway: its parts and the rerun's,
    # all in the cache folder, every row of the first attempt there twice.
    import json

    import ray.data

    from pipeline.config import ConfigError, load_config
    from pipeline.train import data as feed

    monkeypatch.setattr(ray.data, "read_parquet", lambda files, filesystem=None: list(files))
    monkeypatch.setattr(feed, "repeat_passes", lambda files, passes: files)
    config = load_config(None)
    info = feed.DatasetInfo(name="d", version="v0001", path=str(tmp_path), digest="0" * 16, rows=6, files=[], subjects=[], has_caption=False)
    feed.precompute_inputs(_FakePlan(6), info, config, str(tmp_path))
    [cache] = tmp_path.glob("precomputed-*")
    for part in cache.glob("parts-*/*.parquet"):
        part.rename(cache / part.name)
    _FakePlan(4).write_parquet(cache)
    (cache / "_PRECOMPUTE_DONE.json").write_text(json.dumps({"rows": 6, "key": "old"}))
    with pytest.raises(ConfigError, match=f"{cache.name}.*10 rows.*6"):
        feed.precompute_inputs(_FakePlan(6), info, config, str(tmp_path))


class _CountingPlan(_FakePlan):
    """A plan that counts the encodes it was asked for (map_batches: FrozenEncoder's)."""

    encodes = 0

    def map_batches(self, *args, **kwargs):
        _CountingPlan.encodes += 1
        return self


def test_a_second_job_reuses_the_precomputed_inputs_without_encoding_or_copying_them(tmp_path, monkeypatch):
    import ray.data

    from pipeline.config import load_config
    from pipeline.train import arraycache
    from pipeline.train import data as feed

    monkeypatch.setattr(ray.data, "read_parquet", lambda files, filesystem=None: list(files))
    monkeypatch.setattr(feed, "repeat_passes", lambda files, passes: files)
    config = load_config(None)

    def dataset_info():
        return feed.DatasetInfo(name="d", version="v0001", path=str(tmp_path), digest="0" * 16, rows=6, files=[], subjects=[], has_caption=False)

    first = dataset_info()
    feed.precompute_inputs(_CountingPlan(6), first, config, str(tmp_path))
    assert (_CountingPlan.encodes, first.precompute) == (2, "made")  # the encoder, then the packing
    monkeypatch.setattr(arraycache, "_write_arrays", lambda *a: pytest.fail("the arrays were copied again"))
    second = dataset_info()
    feed.precompute_inputs(_CountingPlan(6), second, config, str(tmp_path))
    assert (_CountingPlan.encodes, second.precompute) == (2, "reused")
    assert second.array_cache == first.array_cache and second.tensor_layout == first.tensor_layout
