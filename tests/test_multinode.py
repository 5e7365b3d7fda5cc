"""The mission on a local multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head and a
worker node, each a raylet of its own): `data build`, a 2-worker `pretrain` and
`finetune-many` of 2 subjects run there through the normal entry points (`ray.address`), their
tasks and workers land on both nodes, and every output equals the same runs on a one-node
cluster of the same size.

Sizes force the spread: each node has 3 logical CPUs and a training process (a Ray Train
worker, or a finetune-many subject actor) reserves 2, so no node holds two; the data tasks (a
Parquet read takes 1 CPU) get the one left on each, and Ray Data spreads its tasks over the
nodes.
"""

import csv
import hashlib
import socket
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.versions import MANIFEST
from pipeline.model import BlipDiffusion
from pipeline.train.trainer import run_training
from tests.imagefiles import make_source

pytestmark = pytest.mark.slow

CPUS_PER_NODE = 3
SUBJECTS = {"dog": "dog", "cat": "cat"}
# 64 px photos, one composite each: 4 rows. Every pretraining step takes all of them (2 workers x
# 2), in file order (centre crops, no shuffle), so the runs can be compared step for step. Two
# steps: the second starts from the first's all-reduced update and optimizer state; on CPU each
# step is a Ray Data epoch of its own (seconds of task start-up on the 2-core CI box).
DATA = ["profile=tiny", "data.decode.size=64", "data.composite.per_photo=1", "tracking.enabled=false"]
TRAIN = ["train.cpus_per_worker=2", "train.data_cpus=0.5", "train.resolution=64", "train.crop=center", "train.shuffle_buffer=0"]
PRETRAIN = ["train.workers=2", "train.batch_size=2", "train.steps=2", "train.lr=1e-3", "train.warmup_steps=0",
            "train.samples.every=0", "train.checkpoint_every=2"]
# The processes that train: Ray Train's workers, and finetune-many's subject actors.
TRAINING_ACTORS = {"RayTrainWorker", "SubjectTrainer"}
FINETUNE = ["finetune.method=lora", "finetune.steps=2", "finetune.lora_rank=2", "finetune.concurrency=2", "finetune.validation_steps=1"]


def _sets(keys):
    return [arg for key in keys for arg in ("--set", key)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("src"), SUBJECTS, per_subject=2)


@pytest.fixture(scope="module")
def no_session_ray():
    """The session's local Ray (conftest's ray_local) is stopped so that `ray.address` is the
    cluster the jobs join, and started again afterwards for the tests that follow."""
    was_running = ray.is_initialized()
    ray.shutdown()
    yield
    ray.shutdown()
    if was_running:  # "local": a new one, never a cluster some other process left running
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)


def _run_mission(source, out, nodes):
    """Start a cluster of `nodes` nodes (CPUS_PER_NODE each; one node gets them all when
    nodes == 1, so both clusters have the same CPUs), run the three jobs on it, and return
    what they made and which nodes ran what."""
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors, list_tasks

    total = CPUS_PER_NODE * 2
    head_cpus = total if nodes == 1 else CPUS_PER_NODE
    # A free dashboard port: the state API (which node ran what) needs the dashboard, and the
    # default 8265 may be another test's `ray start --head`.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": True,
                                                           "dashboard_port": _free_port()})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=CPUS_PER_NODE)
        cluster.wait_for_nodes()
        address = [f"ray.address={cluster.address}"]
        # Asked by the dashboard's URL: left to find "the" cluster, the state API takes the newest
        # Ray on the machine, which need not be this one.
        state = {"address": f"http://{cluster.webui_url}", "limit": 10_000, "raise_on_missing_output": False}

        def trainers():
            return [a for a in list_actors(detail=True, **state) if a.class_name in TRAINING_ACTORS]

        data, runs, subjects = out / "data", out / "runs", out / "subjects"

        started = time.perf_counter()
        assert main(["data", "build", "--source", str(source), "--out", str(data), "--no-progress", *_sets(DATA + address)]) == 0
        build_nodes = _nodes_of(lambda: list_tasks(detail=True, **state))

        result = run_training(load_config(overrides=[*DATA, *address, *TRAIN, *PRETRAIN, f"train.data={data}",
                                                     f"train.storage_path={runs}"]))
        pretrain_nodes = _nodes_of(trainers)
        trainers_before = {a.actor_id for a in trainers()}

        argv = ["finetune-many", "--data", str(data), "--subjects", ",".join(SUBJECTS), "--out", str(subjects)]
        assert main([*argv, *_sets(DATA + address + TRAIN + FINETUNE + [f"train.storage_path={runs}"])]) == 0
        finetune_nodes = _nodes_of(lambda: [a for a in trainers() if a.actor_id not in trainers_before])
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
        cluster.shutdown()
    return {"data": data, "pretrain": result, "subjects": subjects, "seconds": seconds,
            "nodes": {"build": build_nodes, "pretrain": pretrain_nodes, "finetune": finetune_nodes}}


def _nodes_of(list_state, timeout_s=30.0):
    """Node ids of what `list_state()` lists. Task and actor events reach the state API about a
    second after they happen, so an empty answer is asked again until `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = {item.node_id for item in list_state() if item.node_id}
        if nodes or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


@pytest.fixture(scope="module")
def runs(no_session_ray, source, tmp_path_factory):
    return {nodes: _run_mission(source, tmp_path_factory.mktemp(f"nodes{nodes}"), nodes) for nodes in (1, 2)}


def test_work_ran_on_both_nodes(runs):
    used = runs[2]["nodes"]
    print(f"single node: {runs[1]['seconds']:.0f} s, two nodes: {runs[2]['seconds']:.0f} s; nodes used: "
          + ", ".join(f"{job} {len(ids)}" for job, ids in used.items()))
    assert len(used["build"]) == 2, used
    assert len(used["pretrain"]) == 2, used  # one training worker per node
    assert len(used["finetune"]) == 2, used  # the two subjects trained at once, one per node
    assert len(runs[1]["nodes"]["pretrain"]) == 1


def _rows(version_dir):
    """Every row as (source, composite index, sha256 of each image column): order-free content."""
    rows = []
    for part in sorted((Path(version_dir) / "data").glob("*.parquet")):
        for row in pq.read_table(part).to_pylist():
            images = tuple(hashlib.sha256(row[c]).hexdigest() for c in ("image", "composite", "alpha", "trimap"))
            rows.append((row["source_uri"], row["composite_index"], row["placement"], *images))
    return sorted(rows)


def test_the_dataset_is_the_same(runs):
    import json

    one, two = (json.loads((runs[n]["data"] / "latest" / MANIFEST).read_text()) for n in (1, 2))
    for key in ("inputs", "accepted", "rejected", "rows", "source_digest", "processing_digest"):
        assert one[key] == two[key], key
    assert one["inputs"] == one["accepted"] + one["rejected"] == 4
    assert one["rows"] == len(_rows(runs[1]["data"] / "latest")) > 0
    assert _rows(runs[1]["data"] / "latest") == _rows(runs[2]["data"] / "latest")


def test_pretraining_is_the_same(runs):
    one, two = runs[1]["pretrain"], runs[2]["pretrain"]
    assert one.step == two.step == 2
    assert one.metrics["loss"] == pytest.approx(two.metrics["loss"], rel=1e-5)
    a = BlipDiffusion.from_pretrained(f"{one.checkpoint}/model").state_dict()
    b = BlipDiffusion.from_pretrained(f"{two.checkpoint}/model").state_dict()
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst


def test_finetuning_is_the_same(runs):
    tables = []
    for n in (1, 2):
        with (runs[n]["subjects"] / "finetune-many.csv").open() as fh:
            tables.append({row["subject_id"]: row for row in csv.DictReader(fh)})
    assert {s: r["status"] for s, r in tables[0].items()} == {s: r["status"] for s, r in tables[1].items()} == dict.fromkeys(SUBJECTS, "ok")
    for subject in SUBJECTS:
        files = sorted(p.name for p in (runs[1]["subjects"] / f"{subject}-lora").iterdir())
        assert files == sorted(p.name for p in (runs[2]["subjects"] / f"{subject}-lora").iterdir())
        for name in (f for f in files if f.endswith(".safetensors")):
            a, b = (load_file(runs[n]["subjects"] / f"{subject}-lora" / name) for n in (1, 2))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{subject}/{name}/{key}")
