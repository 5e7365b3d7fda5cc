"""A published version whose shard holds image bytes that do not decode (not an image, or cut
short), as the training feed meets them: the decode names the column and the data file, the
driver names the file, the row and its subject, and the command exits 2 suggesting
`subjectforge data verify`, after one attempt (Ray Train does not restart the workers for a
deterministic failure). Before, each of Ray Train's attempts failed the same way and the run
ended with exit 1 and a worker's stack trace."""

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.train.data import build_training_plan, open_dataset, precompute_inputs, undecodable_rows_refused
from stages.online_composite import prepare_cutout_batch
from stages.records import ALPHA, COMPOSITE, FOREGROUND, IMAGE
from stages.train_inputs import PATH, UndecodableImage, prepare_batch
from tests.tinydata import publish_dataset

SHARD = "data/part-00000.parquet"
BAD_ROW = 3  # rows are in subject order: cat 0-1, dog 2-3


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One healthy version (4 rows of 32 x 32), copied by each test before it is damaged."""
    return publish_dataset(tmp_path_factory.mktemp("clean"), {"dog": "dog", "cat": "cat"}, per_subject=2, size=(32, 32))


def damaged_copy(clean, tmp_path, column=IMAGE, how="truncated"):
    """A copy of `clean`'s dataset root whose shard has row BAD_ROW's `column` damaged."""
    root = tmp_path / "ds"
    shutil.copytree(clean.parent, root, symlinks=True)
    shard = root / clean.name / SHARD
    table = pq.read_table(shard)
    values = table.column(column).to_pylist()
    values[BAD_ROW] = values[BAD_ROW][: len(values[BAD_ROW]) // 2] if how == "truncated" else b"not an image at all"
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, pa.array(values, pa.binary())), shard)
    return root


def shard_batch(root):
    """The shard's rows as a Ray Data batch of read_parquet(include_paths=True) holds them."""
    shard = next(root.glob(f"v*/{SHARD}"))
    batch = pq.read_table(shard).to_pydict()
    batch[PATH] = [str(shard)] * len(batch[IMAGE])
    return batch, shard


@pytest.mark.parametrize("how", ["truncated", "not an image"])
@pytest.mark.parametrize("column", [IMAGE, FOREGROUND, ALPHA])
def test_the_online_feed_names_the_column_and_file_that_do_not_decode(clean, tmp_path, column, how):
    batch, shard = shard_batch(damaged_copy(clean, tmp_path, column, how))
    with pytest.raises(UndecodableImage) as caught:
        prepare_cutout_batch(batch, resolution=32, crop="center")
    assert (caught.value.column, caught.value.file) == (column, str(shard))


def test_the_stored_feed_names_the_column_and_file_that_do_not_decode(clean, tmp_path):
    batch, shard = shard_batch(damaged_copy(clean, tmp_path, COMPOSITE, "not an image"))
    with pytest.raises(UndecodableImage) as caught:
        prepare_batch(batch, processor=None, resolution=32, crop="center")  # the composite decodes first
    assert (caught.value.column, caught.value.file) == (COMPOSITE, str(shard))


class _RayStyleError(Exception):
    """A Ray task's error as the driver gets it: the worker's exception in `cause`, not chained."""

    def __init__(self, cause):
        super().__init__("UDF failed to process a data block")
        self.cause = cause


@pytest.mark.parametrize("known_file", [True, False])  # False: bytes read back from a precomputed cache
def test_the_driver_names_the_file_row_and_subject(clean, tmp_path, known_file):
    root = damaged_copy(clean, tmp_path)
    batch, shard = shard_batch(root)
    if not known_file:
        del batch[PATH]
    with pytest.raises(UndecodableImage) as caught:
        prepare_cutout_batch(batch, resolution=32, crop="center")
    with pytest.raises(ConfigError) as refused, undecodable_rows_refused(str(root / "latest")):
        raise _RayStyleError(caught.value)
    message = str(refused.value)
    assert f"{SHARD}: row {BAD_ROW} (subject dog): image does not decode" in message, message
    assert "subjectforge data verify" in message and "Traceback" not in message


def test_other_errors_pass_through(clean):
    with pytest.raises(KeyError), undecodable_rows_refused(str(clean)):
        raise KeyError("a bug keeps its stack trace")


def test_ray_train_is_told_to_stop_at_rows_that_do_not_decode():
    from pipeline.train.trainer import StopAtUndecodableRows

    bad = UndecodableImage("not an image", "0" * 64, IMAGE, "/data/part-00000.parquet")
    from ray.train import ControllerError

    # A ControllerError, which Ray Train's callback manager passes on without logging its traceback.
    with pytest.raises(ControllerError) as stopped:
        StopAtUndecodableRows().after_exception(None, {0: KeyError("collateral"), 1: _RayStyleError(bad)})
    assert stopped.value.controller_failure is bad
    StopAtUndecodableRows().after_exception(None, {0: KeyError("another failure: Ray Train retries it")})


def _config(root, runs, *extra):
    return load_config(
        overrides=[
            "profile=tiny",
            f"train.data={root}",
            f"train.storage_path={runs}",
            "train.resolution=32",
            "train.batch_size=2",
            *extra,
        ]
    )


class _Processor:
    """A stand-in for the model's image processor: the stored feed's healthy composites go through it."""

    def preprocess(self, image):
        return [torch.zeros(3, 8, 8)]


@pytest.mark.parametrize("composite", ["online", "stored"])
def test_the_training_plan_stops_once_naming_the_row(ray_local, clean, tmp_path, composite):
    # The Ray Data tasks' error reaches the driver as the UndecodableImage itself
    # (pipeline.train.data.read_parquet), not as the text of Ray Data's UserCodeException.
    root = damaged_copy(clean, tmp_path)
    info = open_dataset(str(root))
    plan = build_training_plan(
        info, _config(root, tmp_path / "runs", f"train.composite={composite}"), processor=_Processor()
    )
    with pytest.raises(ConfigError, match=rf"{SHARD}: row {BAD_ROW} \(subject dog\): image does not decode"):
        with undecodable_rows_refused(info.path):
            plan.take_all()


# An actor loading the frozen encoders (about 15 s on the 2-core box).
@pytest.mark.slow
def test_a_failed_precompute_leaves_nothing_in_storage(ray_local, clean, tmp_path):
    root, runs = damaged_copy(clean, tmp_path), tmp_path / "runs"
    info = open_dataset(str(root))
    config = _config(root, runs, "train.composite=online", "train.precompute=true")
    with pytest.raises(ConfigError, match="image does not decode"), undecodable_rows_refused(info.path):
        precompute_inputs(build_training_plan(info, config, processor=None), info, config, str(runs))
    assert not runs.exists() or not list(runs.iterdir())


# One Ray Train start (about 45 s on the 2-core box): the wiring the tests above cover in parts.
@pytest.mark.slow
def test_pretrain_exits_2_naming_the_row_after_one_attempt(ray_local, clean, tmp_path, monkeypatch, capsys):
    import pipeline.train.trainer as trainer
    from pipeline.cli import main

    raised = []

    class Recording(trainer.TorchTrainer):
        def fit(self):
            try:
                return super().fit()
            except Exception as exc:
                raised.append(exc)
                raise

    monkeypatch.setattr(trainer, "TorchTrainer", Recording)
    root, runs = damaged_copy(clean, tmp_path), tmp_path / "runs"
    flags = [
        "--data", str(root), "--set", f"train.storage_path={runs}", "--set", "tracking.enabled=false",
        "--set", "train.batch_size=2", "--set", "train.steps=2", "--set", "train.resolution=32",
        "--set", "train.cpus_per_worker=0.5", "--set", "train.samples.every=0", "--set", "train.max_failures=2",
    ]  # fmt: skip
    assert main(["pretrain", "--profile", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert (
        f"{SHARD}: row {BAD_ROW} (subject dog): image does not decode" in err and "subjectforge data verify" in err
    ), err
    # Ray Train's controller stopped at the first failure: a WorkerGroupError would mean the
    # workers were restarted train.max_failures times first.
    from ray.train import ControllerError

    assert [type(e) for e in raised] == [ControllerError], raised
    assert sorted(p.name for p in runs.iterdir()) == ["pretrain-v0001"]  # nothing written beside the run
