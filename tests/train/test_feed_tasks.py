"""What Ray Train's own processes unpickle of a training job imports no model code: its
controller unpickles the run's callbacks and the training plan, its DatasetManager and the
feed's SplitCoordinator the plan, each before the job's first batch
(pipeline/train/feed_tasks.py, pipeline/train/callbacks.py). The feed's data tasks open the
checkpoint's image processor without transformers and diffusers (pipeline/model/__init__.py).
The plan runs without Ray Data's progress bars (pipeline.train.data.read_parquet)."""

import subprocess
import sys

import cloudpickle

from pipeline.config import load_config
from pipeline.train.callbacks import StopAtUndecodableRows
from pipeline.train.data import build_training_plan
from pipeline.train.feed_tasks import pack_processor
from pipeline.train.trainer import check_training
from tests.tinydata import publish_dataset

_HEAVY = ("torch", "transformers", "diffusers", "pipeline.model", "stages.train_inputs", "stages.online_composite")

_LOAD = """
import pickle, sys
import ray  # a Ray process has it already
*plans, processor = sys.argv[1:]
for path in plans:
    with open(path, "rb") as f:
        pickle.load(f)
print(" ".join(name for name in {heavy!r} if name in sys.modules))
with open(processor, "rb") as f:
    pickle.load(f)
print(" ".join(name for name in ("transformers", "diffusers") if name in sys.modules))
"""


def test_ray_trains_processes_unpickle_no_model_code_and_a_data_task_opens_the_processor_without_it(ray_local, tmp_path, monkeypatch):
    from ray.data import DataContext

    # A user's process draws Ray Data's progress bars (the tests' conftest turns them off).
    monkeypatch.setattr(DataContext.get_current(), "enable_progress_bars", True)
    root = tmp_path / "ds"
    publish_dataset(root, {"dog": "dog", "cat": "cat"}, per_subject=2)
    paths = [tmp_path / "callback.pkl"]
    paths[0].write_bytes(cloudpickle.dumps(StopAtUndecodableRows()))
    for composite in ("stored", "online"):
        config = load_config(overrides=[
            "profile=tiny", f"train.data={root}", "train.batch_size=2", "train.resolution=64",
            f"train.composite={composite}", "train.precompute=false",
        ])  # fmt: skip
        info, processor = check_training(config)
        plan = build_training_plan(info, config, processor, passes=2)
        # The coordinator runs the plan with its own context: no progress bars redrawn into the job's log.
        assert plan.context.enable_progress_bars is False, composite
        paths.append(tmp_path / f"{composite}.pkl")
        paths[-1].write_bytes(cloudpickle.dumps(plan))
    paths.append(tmp_path / "processor.pkl")
    paths[-1].write_bytes(pack_processor(processor))
    code = _LOAD.format(heavy=_HEAVY)
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["", ""], done.stdout
