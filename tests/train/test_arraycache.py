"""The precomputed inputs as memory-mapped arrays (pipeline/train/arraycache.py): the same rows
come out as the cache's Parquet parts hold, every row once per epoch, the same order for the
same seed on any run, equal disjoint shares per worker, and a resumed stream continues at the
batch it stopped before."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.train.arraycache import ARRAYS, ArrayStream, array_cache
from pipeline.train.data import pack_tensor_columns, read_tensor_layout

ROWS = 40


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A precompute cache as precompute_inputs writes it: Parquet parts of fixed-size binary
    tensor columns plus strings; row i's tensors hold i, so a batch says which rows it has."""
    root = tmp_path_factory.mktemp("precomputed")
    for part, rows in enumerate((range(0, 17), range(17, ROWS))):
        ids = np.array(list(rows))
        batch = {
            "category": np.array([f"cat{i}" for i in ids], dtype=object),
            "caption": np.array([f"caption {i}" for i in ids], dtype=object),
            "latent_params": np.broadcast_to(ids[:, None, None, None], (len(ids), 2, 3, 3)).astype(np.float32),
            "image_features": np.broadcast_to(ids[:, None, None], (len(ids), 5, 4)).astype(np.float16),
        }
        pq.write_table(pack_tensor_columns(batch), root / f"part-{part}.parquet")
    layout = read_tensor_layout(pq.read_schema(root / "part-0.parquet"))
    return root, array_cache(str(root), layout)


def rows_of(batch) -> list[int]:
    ids = batch["latent_params"][:, 0, 0, 0].long().tolist()
    assert batch["image_features"][:, 0, 0].long().tolist() == ids
    assert batch["category"] == [f"cat{i}" for i in ids] and batch["caption"] == [f"caption {i}" for i in ids]
    assert batch["latent_params"].dtype == torch.float32 and batch["image_features"].dtype == torch.float16
    return ids


def take(stream, count):
    try:
        return [rows_of(next(stream)) for _ in range(count)]
    finally:
        stream.close()


def test_arrays_hold_the_parquet_rows(cache):
    root, folder = cache
    assert folder == root / ARRAYS
    latents = np.load(folder / "latent_params.npy")
    assert latents.shape == (ROWS, 2, 3, 3) and (latents[:, 0, 0, 0] == np.arange(ROWS)).all()
    layout = read_tensor_layout(pq.read_schema(root / "part-0.parquet"))
    assert array_cache(str(root), layout) == folder  # made once, then reused
    assert array_cache("s3://bucket/precomputed-x", layout) is None


def test_every_row_once_an_epoch_and_the_same_order_for_the_same_seed(cache):
    _, folder = cache
    first = take(ArrayStream(folder, 8, rank=0, world_size=1, seed=3), 10)  # 5 batches an epoch
    epochs = [sorted(sum(first[:5], [])), sorted(sum(first[5:], []))]
    assert epochs == [list(range(ROWS))] * 2
    assert first[:5] != first[5:]  # a new order each epoch
    assert take(ArrayStream(folder, 8, rank=0, world_size=1, seed=3), 10) == first
    assert take(ArrayStream(folder, 8, rank=0, world_size=1, seed=4), 5) != first[:5]


def test_workers_take_equal_disjoint_shares(cache):
    _, folder = cache
    shares = [sum(take(ArrayStream(folder, 6, rank=r, world_size=3, seed=0), 2), []) for r in range(3)]
    assert [len(s) for s in shares] == [12, 12, 12]  # 13 rows each, one batch of 6 twice
    assert len(set().union(*map(set, shares))) == 36


def test_a_resumed_stream_continues_where_it_stopped(cache):
    _, folder = cache
    whole = take(ArrayStream(folder, 8, rank=0, world_size=1, seed=1), 12)
    assert take(ArrayStream(folder, 8, rank=0, world_size=1, seed=1, consumed=7), 5) == whole[7:]


def test_a_batch_larger_than_a_share_is_a_config_error(cache):
    _, folder = cache
    with pytest.raises(ConfigError, match="train.batch_size"):
        ArrayStream(folder, 16, rank=0, world_size=4, seed=0)


def test_a_worker_without_the_arrays_is_told_the_storage_is_not_shared(tmp_path):
    with pytest.raises(ConfigError, match="train.storage_path"):
        ArrayStream(tmp_path / "arrays", 4, rank=0, world_size=1, seed=0)


def test_two_jobs_making_the_arrays_at_once_on_nodes_with_the_same_pid(cache, tmp_path, monkeypatch):
    # Two drivers in containers often have the same pid: the second must not take the first's
    # staging folder (deleting its files and renaming its own half-written ones into place).
    import shutil

    from pipeline.train import arraycache

    root = tmp_path / "precomputed"
    shutil.copytree(cache[0], root, ignore=shutil.ignore_patterns(ARRAYS))
    layout = read_tensor_layout(pq.read_schema(root / "part-0.parquet"))
    monkeypatch.setattr(arraycache.os, "getpid", lambda: 7)
    write = arraycache._write_arrays
    other_job: list = []

    def first_job_writes(files, folder, columns):
        if not other_job:  # the other node's job runs whole between this one's mkdir and its writes
            other_job.append(None)
            other_job[0] = array_cache(str(root), layout)
        write(files, folder, columns)

    monkeypatch.setattr(arraycache, "_write_arrays", first_job_writes)
    folder = array_cache(str(root), layout)
    assert folder == other_job[0] == root / ARRAYS
    assert (np.load(folder / "latent_params.npy")[:, 0, 0, 0] == np.arange(ROWS)).all()
    assert [p.name for p in root.iterdir() if p.name.startswith(ARRAYS)] == [ARRAYS]  # no staging left
