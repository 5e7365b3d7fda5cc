"""The plan's Ray Data wiring: batches the GPU matte actor receives, the fused CPU task after it."""

import os
from collections import Counter

import numpy as np
import pytest
from ray.data import ActorPoolStrategy

from pipeline.config import ConfigError, load_config
from pipeline.data.backgrounds import list_backgrounds
from pipeline.data.plan import batch_aligned_dataset, build_dataset_plan, filter_composite_encode, finish_args
from stages.composite import composite_batch
from stages.filter import filter_batch
from stages.write import encode_batch


@pytest.mark.slow
@pytest.mark.parametrize("photos", [130, 64, 7])
def test_each_matte_actor_call_is_one_full_batch(ray_local, photos):
    # Between the input and the matte actor the plan has CPU tasks of 4-row batches and another
    # actor; none of them may merge or split the blocks, or the matte actor gets 64 + 29.
    # (Defined here so that Ray pickles them by value: workers cannot import test modules.)
    class _BatchSizes:
        """Records the rows of each batch it gets (the last call's count wins)."""

        def __call__(self, batch):
            return {"id": batch["id"], "rows": np.full(len(batch["id"]), len(batch["id"]))}

    def _pass_through(batch):
        return batch

    ds = batch_aligned_dataset([{"id": i} for i in range(photos)], 16)
    ds = ds.map_batches(_pass_through, batch_size=4)
    ds = ds.map_batches(_BatchSizes, batch_size=8, compute=ActorPoolStrategy(size=1))
    ds = ds.map_batches(_pass_through, batch_size=4)
    ds = ds.map_batches(_BatchSizes, batch_size=16, compute=ActorPoolStrategy(size=1))
    rows_by_batch_size = Counter(ds.to_pandas()["rows"].tolist())
    full, rest = divmod(photos, 16)
    assert rows_by_batch_size == Counter({16: 16 * full, rest: rest} if rest else {16: 16 * full})


def test_the_fused_cpu_task_is_filter_composite_encode_in_order():
    """filter_composite_encode with the plan's arguments gives the rows of the three stages
    called one after another (a rejected row and K=2 composites of the accepted ones)."""
    rng = np.random.default_rng(0)
    n = 3
    images = np.empty(n, dtype=object)
    alphas = np.empty(n, dtype=object)
    for i in range(n):
        images[i] = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        alphas[i] = np.zeros((40, 48), np.float32)
        alphas[i][8 : 30 - 10 * (i == 2), 10:40] = 1.0 if i != 2 else 0.0  # photo 2: empty matte
    obj = lambda *xs: np.array(xs, dtype=object)  # noqa: E731
    batch = {
        "subject_id": obj("dog", "dog", "dog"), "category": obj("dog", "dog", "dog"),
        "source_uri": obj("a", "b", "c"), "source_sha256": obj("aa", "bb", "cc"),
        "reject_stage": obj("", "", ""), "reject_reason": obj("", "", ""),
        "image": images, "foreground": images, "alpha": alphas, "trimap": alphas,
        "width": np.full(n, 48), "height": np.full(n, 40),
    }  # fmt: skip
    config = load_config(overrides=["data.composite.per_photo=2"])
    args = finish_args(config, list_backgrounds(None), "v0003")
    fused = filter_composite_encode({k: v.copy() for k, v in batch.items()}, **args)
    chained = encode_batch(
        composite_batch(filter_batch(dict(batch), **args["filter_args"]), **args["composite_args"]),
        **args["encode_args"],
    )
    assert list(fused["reject_stage"]) == ["", "", "", "", "filter"]
    assert fused.keys() == chained.keys()
    for name in fused:
        if not name.startswith("t_"):
            assert list(fused[name]) == list(chained[name]), name


@pytest.mark.parametrize(
    "cpus, gpus, settings, fails",
    [
        (8, 1, [], True),  # three CLIPSeg, three matte and two captioner actors per GPU: every CPU held, decode never runs
        (9, 1, [], False),
        (4, 1, ["data.matte.num_actors=1", "data.segment.num_actors=1"], True),
        (5, 1, ["data.matte.num_actors=1", "data.segment.num_actors=1"], False),
        (4, 1, ["data.matte.num_actors=1", "data.segment.num_actors=1", "data.caption.num_actors=1"], False),
        (3, 1, ["data.matte.num_actors=1", "data.segment.num_actors=1", "data.caption.enabled=false"], False),
        (8, 1, ["data.segment.num_actors=4"], True),
        (2, 0, [], False),  # no GPU: matting is CPU tasks, only CLIPSeg holds a CPU (the captioner shares the tasks')
        (1, 0, [], True),
    ],
)
def test_a_plan_whose_actors_hold_every_cpu_is_refused(monkeypatch, cpus, gpus, settings, fails):
    import pipeline.data.plan as dataplan

    class Accepted(Exception):
        """The plan got past its checks to building the input dataset."""

    def accepted(*args, **kwargs):
        raise Accepted

    monkeypatch.setattr(dataplan.ray, "cluster_resources", lambda: {"CPU": float(cpus), "GPU": float(gpus)})
    monkeypatch.setattr(dataplan, "batch_aligned_dataset", accepted)
    monkeypatch.setattr(dataplan.ray.data, "from_items", accepted)
    photo = {"subject_id": "dog", "category": "dog", "source_uri": "a", "source_path": "/a", "source_sha256": "aa"}
    with pytest.raises(ConfigError if fails else Accepted, match="leave none for decoding" if fails else None):
        build_dataset_plan([photo], load_config(overrides=settings), [], "v0001")


@pytest.mark.parametrize("high, erode_fg_px, rejected", [(0.9, 0, False), (0.999, 1, True)])
def test_segment_and_trimap_actor_gives_the_two_stages_in_order(high, erode_fg_px, rejected):
    """The plan's CLIPSeg actor runs the trimap stage on its output: same rows, rejects and
    timings as the segment actor and the trimap adapter called one after the other."""
    from pipeline.config import PROFILE_MODELS
    from pipeline.data.plan import SegmentAndTrimap
    from stages.segment import Segmenter
    from stages.trimap import trimap_batch

    rng = np.random.default_rng(1)
    images = np.empty(3, dtype=object)
    images[:] = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((48, 40, 3), (32, 32, 3), (40, 56, 3))]
    obj = lambda *xs: np.array(xs, dtype=object)  # noqa: E731
    batch = {
        "source_uri": obj("a", "b", "c"), "category": obj("dog", "cat", "dog"), "image": images,
        "reject_stage": obj("", "decode", ""), "reject_reason": obj("", "unreadable", ""),
    }  # fmt: skip
    config = load_config(overrides=["profile=tiny"])
    segment_args = {"model_path": PROFILE_MODELS["tiny"]["clipseg"], "batch_size": 2, "normalize": "minmax"}
    # high=0.999 leaves the min-max maps a foreground of a few pixels, which erosion removes:
    # the trimap stage rejects both photos.
    trimap_args = {**config.data.trimap.model_dump(), "high": high, "erode_fg_px": erode_fg_px}
    fused = SegmentAndTrimap(trimap_args=trimap_args, **segment_args)({k: v.copy() for k, v in batch.items()})
    chained = trimap_batch(Segmenter(**segment_args)({k: v.copy() for k, v in batch.items()}), **trimap_args)
    assert "confidence" not in fused and fused.keys() == chained.keys()
    assert list(fused["reject_stage"]) == list(chained["reject_stage"])
    assert list(fused["reject_reason"]) == list(chained["reject_reason"])
    assert list(fused["reject_stage"]) == (["trimap", "decode", "trimap"] if rejected else ["", "decode", ""])
    for i in (0, 2):
        np.testing.assert_array_equal(fused["trimap"][i], chained["trimap"][i])
        assert rejected or set(np.unique(fused["trimap"][i])) == {0.0, 0.5, 1.0}
    assert {"t_segment", "t_trimap"} <= fused.keys()


def test_the_gpu_matte_stage_gets_the_filter_and_composite_arguments():
    from pipeline.config import MatteConfig
    from pipeline.data.plan import Cluster, matte_stage
    from stages.matte import matte_batch
    from stages.matte_composite import MatteFilterComposite

    finish = {"filter_args": {"min_area": 0.1, "max_area": 0.9}, "composite_args": {"per_photo": 3}}
    gpu = matte_stage(MatteConfig(backend="torch"), Cluster(cpus=16, gpus=1), finish=finish)
    assert gpu.fn is MatteFilterComposite and {k: gpu.args[k] for k in finish} == finish
    cpu = matte_stage(MatteConfig(backend="torch"), Cluster(cpus=16, gpus=0), finish=finish)
    assert cpu.fn is matte_batch and not set(finish) & set(cpu.args)  # filter_composite_encode follows


def test_the_plan_and_process_photos_fold_one_stage_list():
    """data_stages declares the chain once: on a GPU cluster the matting actors composite and
    only encoding follows; in one process (process_photos) the same stages, with the same
    arguments, but matting photo by photo and filter, composite and encode after it. The tol
    reaches the matte stage either way."""
    from pipeline.data.plan import Cluster, data_stages, filter_composite_encode

    config = load_config(overrides=["profile=tiny", "data.matte.tol=3e-5"])
    cluster = data_stages(config, Cluster(cpus=16, gpus=1), list_backgrounds(None), "v0001")
    here = data_stages(config, Cluster(cpus=1, gpus=1, pools=False), list_backgrounds(None), "v0001")
    assert [s.name for s in cluster] == ["decode", "segment", "caption", "matte", "encode"]
    assert [s.name for s in here] == ["decode", "segment", "caption", "matte", "filter_composite_encode"]
    assert here[-1].fn is filter_composite_encode and here[3].args == {"backend": "torch", "tol": 3e-5}
    assert cluster[3].args["tol"] == 3e-5 and cluster[3].actors == 3
    for ours, theirs in zip(cluster[:3], here[:3], strict=True):
        assert (ours.fn, ours.args, ours.batch_size) == (theirs.fn, theirs.args, theirs.batch_size)


@pytest.mark.parametrize("gpus", [0.5, 1, 4])
def test_the_auto_gpu_shares_fill_each_gpu_at_most(gpus):
    """auto on a GPU cluster: per GPU three matting actors at 0.2, two captioners at 0.125 (one at
    0.25 capped the build at 124 photos/s: pipeline/config.py) and three CLIPSeg actors sharing
    the rest, 0.0499 each in Ray's 1e-4 units as beside one captioner at 0.25. Over a GPU, Ray
    would start the actors that fit and the plan would wait for the others forever."""
    from pipeline.data.plan import Cluster, data_stages

    stages = {s.name: s for s in data_stages(load_config(), Cluster(cpus=64, gpus=gpus), list_backgrounds(None), "v0001")}
    per_gpu = max(1, int(gpus))
    held = {name: (stages[name].actors // per_gpu, stages[name].num_gpus) for name in ("segment", "caption", "matte")}
    assert held == {"segment": (3, 0.0499), "caption": (2, 0.125), "matte": (3, 0.2)}
    assert sum(actors * round(share * 1e4) for actors, share in held.values()) <= 1e4


@pytest.fixture(scope="module")
def fake_gpu_ray():
    """A local Ray with a GPU it does not have (benchmarks/bench_pipeline.py's CPU sanity mode):
    the plan takes its GPU branch, matting actors and all, and they run on the CPU. 4 CPUs: the
    CLIPSeg and the matte actor hold one each. The session's Ray (conftest's ray_local) is
    stopped for it and started again after."""
    import ray

    was_running = ray.is_initialized()
    ray.shutdown()
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    if was_running:  # "local": a new one, never a cluster some other process left running
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


@pytest.mark.slow
def test_a_build_through_the_finishing_matte_actor_equals_the_cpu_plans(fake_gpu_ray, tmp_path, monkeypatch):
    """The same source built twice on a cluster with a GPU: through the matting actors that filter
    and composite on their device, and through the CPU plan (the matte stage told there is no
    GPU: torch matting per photo, then filter_composite_encode). Both solve each photo alone
    (the sample's photos are square, so the actor's batches stack, and a stacked solve equals a
    single one), so the two builds must agree on everything but the composites' pixels (the
    torch composite, a level apart here and there: tests/stages/test_composite_torch.py; measured, 13 of
    the 14 decoded JPEG composites equal, the other 0.004 levels apart on average): the counts,
    the rejects and their reasons, and per row the draws, the area and the published photo,
    alpha and trimap bytes. max_area 0.58 sits among the sample's areas (0.54-0.61 at 64 px with
    the tiny CLIPSeg), so that the filter rejects some photos and passes the others."""
    import dataclasses
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    import pipeline.data.plan as dataplan
    from pipeline.data.build import build_dataset
    from stages.matte_composite import MatteFilterComposite
    from stages.write import DATA_SCHEMA
    from tests.imagefiles import broken_files, make_source

    source = make_source(tmp_path / "src", {"dog": "dog", "cat": "cat", "backpack": "backpack"}, per_subject=4)
    for name, data in list(broken_files().values())[:2]:
        (source / "cat" / name).write_bytes(data)
    settings = ["profile=tiny", "data.decode.size=64", "data.matte.backend=torch", "data.matte.batch_size=4", "data.matte.num_actors=1", "data.segment.num_actors=1",
                "data.caption.num_actors=1", "data.filter.max_area=0.58", "tracking.enabled=false"]  # fmt: skip
    matte_stage, stages, builds = dataplan.matte_stage, [], {}
    for plan, gpus_seen in (("gpu", None), ("cpu", 0)):

        def recorded(matte, cluster, gpus_seen=gpus_seen, **kwargs):
            seen = cluster if gpus_seen is None else dataclasses.replace(cluster, gpus=gpus_seen)
            stages.append(matte_stage(matte, seen, **kwargs))
            return stages[-1]

        monkeypatch.setattr(dataplan, "matte_stage", recorded)
        config = load_config(overrides=settings)
        builds[plan] = build_dataset(source, tmp_path / plan, config, incremental=False, progress=False)
    assert stages[0].fn is MatteFilterComposite and stages[0].args["composite_args"]["per_photo"] == 2
    assert stages[1].fn is not MatteFilterComposite

    gpu, cpu = builds["gpu"], builds["cpu"]
    counts = ("inputs", "accepted", "rejected", "rows", "rejects_by_stage")
    assert gpu.status == cpu.status == "built"
    assert {k: gpu.manifest[k] for k in counts} == {k: cpu.manifest[k] for k in counts}
    m = gpu.manifest
    assert m["inputs"] == 14 == m["accepted"] + m["rejected"] and m["rows"] == 2 * m["accepted"]
    assert m["rejects_by_stage"]["decode"] == 2 and 0 < m["rejects_by_stage"]["filter"] < 12

    def rejects(result):
        return sorted(pq.read_table(result.path / "rejects.parquet").to_pylist(), key=lambda r: r["source_uri"])

    def rows(result):
        table = pq.read_table(result.path / "data")
        assert table.schema == DATA_SCHEMA
        return sorted(table.to_pylist(), key=lambda r: (r["source_uri"], r["composite_index"]))

    assert rejects(gpu) == rejects(cpu)
    gpu_rows, cpu_rows = rows(gpu), rows(cpu)
    uris = {r["source_uri"] for r in gpu_rows} | {r["source_uri"] for r in rejects(gpu)}
    assert uris == {p.relative_to(source).as_posix() for p in source.rglob("*") if p.parent != source}
    assert len(gpu_rows) == len(cpu_rows) == m["rows"]
    for got, want in zip(gpu_rows, cpu_rows, strict=True):
        assert got["alpha_area"] == pytest.approx(want["alpha_area"], rel=1e-6)
        for name in ("source_uri", "composite_index", "seed", "background_id", "placement", "image", "alpha", "trimap"):
            assert got[name] == want[name], (name, got["source_uri"])
        composites = [np.asarray(Image.open(io.BytesIO(r["composite"])), int) for r in (got, want)]
        assert composites[0].shape == (64, 64, 3) and np.abs(composites[0] - composites[1]).mean() < 0.1


def test_process_photos_captions_every_accepted_photo_and_rejects_a_planted_person(tmp_path, monkeypatch):
    """The chain in one process (the plan's stages, in order): the photos of a planted person
    (CLIPSeg's 'person' map of the cat photos replaced by a figure covering 12.5%) are rejected at
    `filter` naming the prompt, before matting; every other photo is accepted with a caption, its
    own (captions.csv) where it has one. Every input is a row or a reject."""
    import torch

    from pipeline.data.build import process_photos
    from pipeline.data.sources import scan_source
    from stages.segment import Segmenter
    from tests.imagefiles import make_source
    from tests.stages.test_filter import planted_figure_logits

    source = make_source(tmp_path / "src", {"dog": "dog", "cat": "cat"}, per_subject=2)
    dog = sorted(p.name for p in (source / "dog").iterdir())
    (source / "captions.csv").write_text(f"photo,caption\ndog/{dog[0]},\"a dog  on a red sofa\"\ndog/{dog[1]},\n")
    scan = scan_source(source)
    predict = Segmenter.prompt_logits

    def planted(self, images, prompt_sets):
        logits = predict(self, images, prompt_sets)
        with torch.inference_mode():
            for b, category in enumerate(prompt_sets[0]):
                person = planted_figure_logits(*logits.shape[-2:]) if category == "cat" else torch.full(logits.shape[-2:], -8.0)
                logits[1, b] = person
        return logits

    monkeypatch.setattr(Segmenter, "prompt_logits", planted)
    config = load_config(overrides=["profile=tiny", "data.decode.size=64", "data.filter.exclude_prompts=[person]"])
    rows, rejects = process_photos(scan.photos, config, "v0001")

    rejected = {r["source_uri"]: r for r in rejects.to_pylist()}
    assert sorted(rejected) == [f"cat/{p.name}" for p in sorted((source / "cat").iterdir())]
    assert {(r["stage"], r["reason"]) for r in rejected.values()} == {
        ("filter", "excluded content: CLIPSeg finds 'person' on 12.5% of the photo > exclude_area 5.0%")
    }
    accepted = {r["source_uri"]: r for r in rows.to_pylist()}
    assert set(accepted) | set(rejected) == {p.source_uri for p in scan.inputs} and not set(accepted) & set(rejected)
    assert (accepted[f"dog/{dog[0]}"]["caption"], accepted[f"dog/{dog[0]}"]["caption_source"]) == ("a dog on a red sofa", "user")
    assert accepted[f"dog/{dog[1]}"]["caption_source"] == "model" and accepted[f"dog/{dog[1]}"]["caption"].strip()


def test_a_local_blip_captioner_gets_one_actor_per_gpu(tmp_path):
    """The caption stage's auto actors follow the captioner folder's model_type (pipeline/config.py
    CAPTION_ACTORS_PER_GPU): one per GPU for BLIP, two for BLIP-2 (the tiny captioner) and for a
    hub id or a folder without a readable config."""
    from pipeline.config import CaptionConfig
    from pipeline.data.plan import Cluster, caption_stage, captioner_family

    blip = tmp_path / "blip"
    blip.mkdir()
    (blip / "config.json").write_text('{"model_type": "blip"}')
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("[not, json")
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "config.json")  # read, it would block the plan
    tiny = load_config(overrides=["profile=tiny"]).model_path("captioner")
    assert [captioner_family(str(p)) for p in (blip, tiny, broken, fifo, "Salesforce/blip2-opt-2.7b")] == ["blip", "blip-2", None, None, None]
    actors = {name: caption_stage(CaptionConfig(), str(path), Cluster(cpus=64, gpus=2), 512).actors
              for name, path in {"blip": blip, "tiny": tiny, "broken": broken}.items()}
    assert actors == {"blip": 2, "tiny": 4, "broken": 4}
