"""The feed's online composites (train.composite online): made in the collate for the epoch it
is told, the same for the same (seed, epoch, row) in a fresh collate (a resumed run's), and the
epoch a resumed run restarts in."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from ray.data.extensions import ArrowTensorArray

from pipeline.config import ASSETS_DIR, ConfigError, load_config
from pipeline.data.backgrounds import list_backgrounds
from pipeline.model import BlipDiffusion, SubjectImageProcessor
from pipeline.train.data import (
    FeedCollate,
    OnlineFeed,
    build_training_plan,
    epoch_at_step,
    online_settings,
    open_dataset,
    precompute_cache,
    precompute_inputs,
)
from pipeline.train.speed import resolve_composite, resolve_precompute
from stages.online_composite import PASS_INDEX, ROW_KEY, OnlineCompositor, row_key
from stages.records import ALPHA, CATEGORY, FOREGROUND
from stages.train_inputs import LATENT_PARAMS, PIXEL_VALUES, TARGET, latent_params
from tests.tinydata import publish_dataset


def _ragged(arrays):
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return ArrowTensorArray.from_numpy(column)


def _table(n=4):
    """Rows as the online plan hands them to the collate: ragged cutouts (photos differ in size)."""
    rng = np.random.default_rng(0)
    shapes = [(40, 56), (48, 48), (40, 56), (56, 40)][:n]
    fgs = [rng.integers(0, 256, (*s, 3), dtype=np.uint8) for s in shapes]
    alphas = []
    for h, w in shapes:
        a = np.zeros((h, w), np.uint8)
        a[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
        alphas.append(a)
    return pa.table({
        CATEGORY: [f"c{i}" for i in range(n)],
        TARGET: ArrowTensorArray.from_numpy(np.zeros((n, 3, 8, 8), np.float32)),
        FOREGROUND: _ragged(fgs),
        ALPHA: _ragged(alphas),
        ROW_KEY: pa.array([row_key(f"{i:064x}", 0) for i in range(n)], pa.int64()),
        PASS_INDEX: pa.array([0, 0, 1, 1][:n], pa.int64()),
    })


def _collate(seed=3):
    processor = SubjectImageProcessor.from_pretrained(ASSETS_DIR / "tiny-blipdiffusion" / "image_processor")
    compositor = OnlineCompositor(list_backgrounds(None), seed=seed, scale_min=0.3, scale_max=0.9)
    return FeedCollate(online=OnlineFeed(compositor, processor, passes=2))


def test_the_collate_composites_for_its_epoch_and_a_fresh_one_agrees():
    table = _table()
    first = _collate()
    batch = first.at_epoch(3)(table)
    assert set(batch) == {CATEGORY, TARGET, PIXEL_VALUES} and batch[PIXEL_VALUES].shape[0] == 4
    resumed = _collate().at_epoch(3)(table)  # a new process after a restart, told the same epoch
    assert torch.equal(batch[PIXEL_VALUES], resumed[PIXEL_VALUES])
    later = first.at_epoch(4)(table)
    for i in range(4):
        assert not torch.equal(later[PIXEL_VALUES][i], batch[PIXEL_VALUES][i])
    # Rows 0 and 2 share a cutout shape but sit in different passes: different composite epochs.
    assert not torch.equal(batch[PIXEL_VALUES][0], batch[PIXEL_VALUES][2])
    assert not torch.equal(_collate(seed=4).at_epoch(3)(table)[PIXEL_VALUES], batch[PIXEL_VALUES])


def test_a_resumed_run_restarts_in_the_epoch_its_step_falls_in():
    # 10 rows x 2 passes over 2 workers: 10 rows each, 3 batches of 3 per Ray Data epoch.
    layout = {"rows": 10, "passes": 2, "workers": 2, "batch_size": 3}
    epochs_of_steps = [micro // 3 for micro in range(0, 40, 2)]  # grad_accum 2: step s starts at micro-batch 2s
    assert [epoch_at_step(s, grad_accum=2, **layout) for s in range(20)] == epochs_of_steps
    assert epoch_at_step(0, grad_accum=1, **layout) == 0 and epoch_at_step(7, grad_accum=1, **layout) == 2


def test_composite_auto_and_precompute():
    assert resolve_composite("auto", method="pretrain", has_cutout=True, precompute="auto") == "online"
    assert resolve_composite("auto", method="pretrain", has_cutout=False, precompute="auto") == "stored"
    assert resolve_composite("auto", method="pretrain", has_cutout=True, precompute=True) == "stored"
    assert resolve_composite("auto", method="lora", has_cutout=True, precompute="auto") == "stored"
    # Online composites precompute their targets by the stored composites' rule: GPUs, 5 epochs.
    for online in (False, True):
        def chosen(gpu=True, steps=10_000, online=online):
            return resolve_precompute("auto", gpu=gpu, rows=160, samples_per_step=16, steps=steps, online=online)

        assert chosen() is True and chosen(steps=50) is True  # 5 planned epochs
        assert chosen(steps=49) is False and chosen(gpu=False) is False
    assert resolve_precompute(True, gpu=False, rows=10, samples_per_step=16, steps=1, online=True) is True
    assert load_config(overrides=["train.composite=online", "train.precompute=true"]).train.precompute is True
    with pytest.raises(ConfigError, match="pretraining's"):
        load_config(overrides=["train.composite=online", "train.method=lora"])


def _rows_of(ds) -> pa.Table:
    """Every row of a Ray Dataset, in (pass, row) order."""
    import ray

    table = pa.concat_tables([ray.get(ref) for ref in ds.to_arrow_refs()])
    return table.sort_by([(PASS_INDEX, "ascending"), (ROW_KEY, "ascending")])


@pytest.mark.slow
def test_precomputed_targets_feed_the_same_composites_and_the_targets_latents(ray_local, tmp_path):
    # train.composite online with train.precompute: the cache holds the targets' VAE posteriors
    # and the cutouts' bytes; its feed must composite exactly as the plain online plan does.
    version = publish_dataset(tmp_path / "ds", {"dog": "dog", "cat": "cat"}, per_subject=3)
    common = ["profile=tiny", f"train.data={version}", "train.resolution=64", "train.crop=center", "train.composite=online"]
    plain_config = load_config(overrides=[*common, "train.precompute=false"])
    config = load_config(overrides=[*common, "train.precompute=true"])
    processor = SubjectImageProcessor.from_pretrained(ASSETS_DIR / "tiny-blipdiffusion" / "image_processor")
    storage = str(tmp_path / "runs")

    info = open_dataset(str(version))
    plain = _rows_of(build_training_plan(info, plain_config, processor, passes=2))
    hybrid = _rows_of(precompute_inputs(build_training_plan(info, config, processor), info, config, storage, passes=2))
    assert info.precompute == "made" and info.array_cache is None
    assert set(info.tensor_layout) == {LATENT_PARAMS}
    import pyarrow.parquet as pq

    schema = pq.read_schema(next((tmp_path / "runs").glob("precomputed-*/parts-*/*.parquet")))
    assert (schema.field(FOREGROUND).type, schema.field(ALPHA).type, schema.field(ROW_KEY).type) == (pa.binary(), pa.binary(), pa.int64())
    assert hybrid.column(ROW_KEY).equals(plain.column(ROW_KEY)) and hybrid.column(PASS_INDEX).equals(plain.column(PASS_INDEX))

    feed = OnlineFeed.build(online_settings(info, config, 2), processor, torch.device("cpu"))
    for epoch in (0, 3):
        ours = FeedCollate(info.tensor_layout, online=feed).at_epoch(epoch)(hybrid)
        theirs = FeedCollate(online=feed).at_epoch(epoch)(plain)
        assert set(ours) == {CATEGORY, "caption", LATENT_PARAMS, PIXEL_VALUES}
        assert torch.equal(ours[PIXEL_VALUES], theirs[PIXEL_VALUES])
    vae = BlipDiffusion.from_pretrained(config.model_path("blip_diffusion")).vae.eval()
    expected = latent_params(vae, theirs[TARGET])
    torch.testing.assert_close(ours[LATENT_PARAMS], expected, rtol=1e-4, atol=1e-4)

    # A second job reuses the cache; the full precompute (stored composites) has its own.
    again = open_dataset(str(version))
    precompute_inputs(build_training_plan(again, config, processor), again, config, storage)
    assert again.precompute == "reused"
    stored = load_config(overrides=[*common, "train.composite=stored", "train.precompute=true"])
    assert precompute_cache(info, stored, storage)[0] != precompute_cache(info, config, storage)[0]
