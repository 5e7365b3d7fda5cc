"""Fine-tuning that checks itself (pipeline/train/validation.py): the subject starts from its
distinct photos, validations run at the right steps with grids and scores logged, the selection
rule and early stopping act on planted scores, and the best checkpoint survives pruning."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import tracking
from pipeline.config import ConfigError, load_config
from pipeline.evaluation.benchmark import LIVE_PROMPTS_FILE, OBJECT_PROMPTS_FILE, read_prompts
from pipeline.evaluation.job import DEFAULT_BENCHMARK
from pipeline.model import BlipDiffusion
from pipeline.train import validation
from pipeline.train.finetune import check_finetune, finetune_key, finetune_subject, read_subject, write_inputs
from pipeline.train.many import SubjectOutcome, format_table
from pipeline.train.methods import get_method
from pipeline.train.validation import checkpoints_to_keep, prune_checkpoints, rank_records, validations_since_best
from stages.train_inputs import decode_rgb
from stages.write import encode_image
from tests.tinydata import publish_dataset

# In process (finetune-many's path, no Ray): 32 px, one denoising step per validation image.
TINY = ["profile=tiny", "train.resolution=32", "tracking.system_metrics=false", "finetune.register_model=false",
        "finetune.method=textual-inversion", "finetune.subject_id=dog", "finetune.batch_size=2", "finetune.validation_steps=1"]


def _records(*rows):
    """Planted validations: (step, dino, clip_i, clip_t) each."""
    return [{"step": s, "checkpoint": f"step-{s:07d}", "dino": d, "clip_i": i, "clip_t": t} for s, d, i, t in rows]


# ---------------------------------------------------------------------------------------------
# Initialisation from the photos


def _two_composites_per_photo(root, photos=3):
    """A dataset version whose subject "dog" has `photos` photos and two composites of each."""
    version = publish_dataset(root, {"dog": "dog"}, per_subject=photos, size=(40, 32))
    part = version / "data" / "part-00000.parquet"
    rows = []
    for row in pq.read_table(part).to_pylist():
        for k in range(2):  # the same photo (image, source_sha256), two backgrounds
            rows.append(row | {"composite": encode_image(torch.randint(0, 255, (32, 40, 3), dtype=torch.uint8).numpy()),
                               "composite_index": k})
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), part)
    return rows


@pytest.mark.parametrize("init_from", ["photos", "composites"])
def test_initial_embedding_is_the_mean_over_distinct_photos(tmp_path, init_from):
    torch.manual_seed(0)
    rows = _two_composites_per_photo(tmp_path / "ds")
    config = load_config(overrides=[*TINY, f"finetune.subject={tmp_path / 'ds'}", f"finetune.init_from={init_from}",
                                    f"train.data={tmp_path / 'inputs'}", "finetune.category=dog"])
    subject = read_subject(config)
    assert len(subject.rows) == 6 and len(subject.photos) == 3  # each photo once
    write_inputs(config, subject, tmp_path / "inputs", base="unused")
    model = BlipDiffusion.from_pretrained(config.model_path("blip_diffusion"))
    # blipd, lora: the methods with subject embeddings (textual inversion starts at the category word)
    initial = get_method("blipd").initial_embeds(model, config)
    photos = [Image.fromarray(decode_rgb(rows[i]["image"])) for i in (0, 2, 4)]
    composites = [Image.fromarray(decode_rgb(r["composite"])) for r in rows]
    expected = photos if init_from == "photos" else composites  # init_photos (6) caps the composites
    assert torch.allclose(initial, model.encode_subject(expected, "dog"), atol=1e-6)
    other = composites if init_from == "photos" else photos
    assert not torch.allclose(initial, model.encode_subject(other, "dog"), atol=1e-4)
    assert len(list((tmp_path / "inputs" / "photos").glob("*.png"))) == 3  # what validation scores against


# ---------------------------------------------------------------------------------------------
# The rules, on planted scores


def test_selection_rules_pick_the_expected_step():
    records = _records(
        (20, 0.60, 0.80, 0.300),
        (40, 0.70, 0.82, 0.295),  # within 0.01 of the best CLIP-T: balanced's pick
        (60, 0.75, 0.85, 0.280),  # the best DINO, but its CLIP-T dropped by 0.02
        (80, 0.65, 0.86, 0.302),  # the best CLIP-T (the bar: 0.292)
    )
    picks = {rule: rank_records(records, rule)[0]["step"] for rule in ("last", "dino", "clip_i", "clip_t", "balanced")}
    assert picks == {"last": 80, "dino": 60, "clip_i": 80, "clip_t": 80, "balanced": 40}
    # Exactly 0.01 below the best CLIP-T still counts (0.30 - 0.01 is not 0.29 in floats).
    assert rank_records(_records((1, 0.9, 0, 0.29), (2, 0.5, 0, 0.30)), "balanced")[0]["step"] == 1
    # A checkpoint that was never the best can become it once a better CLIP-T raises the bar.
    early = _records((1, 0.70, 0, 0.300), (2, 0.60, 0, 0.305))
    assert rank_records(early, "balanced")[0]["step"] == 1
    assert rank_records(early + _records((3, 0.50, 0, 0.312)), "balanced")[0]["step"] == 2
    # Ties go to the earlier step.
    assert rank_records(_records((1, 0.5, 0, 0.3), (2, 0.5, 0, 0.3)), "dino")[0]["step"] == 1


def test_patience_counts_validations_since_the_best():
    records = _records((1, 0.5, 0, 0.3), (2, 0.6, 0, 0.3), (3, 0.55, 0, 0.3), (4, 0.58, 0, 0.3))
    assert validations_since_best(records, "dino") == 2
    assert validations_since_best(records, "last") == 0
    assert validations_since_best([], "balanced") == 0


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    records = _records((1, 0.9, 0, 0.3), (2, 0.5, 0, 0.3), (3, 0.7, 0, 0.3), (4, 0.6, 0, 0.3))
    for r in records:
        (tmp_path / r["checkpoint"]).mkdir()
    (tmp_path / "inputs").mkdir()
    assert checkpoints_to_keep(records, "dino", keep=1, newest="step-0000004") == {"step-0000004", "step-0000001"}
    assert checkpoints_to_keep(records, "dino", keep=3, newest="step-0000004") == {"step-0000004", "step-0000001", "step-0000003"}
    assert prune_checkpoints(tmp_path, {"step-0000004", "step-0000001"}) == ["step-0000002", "step-0000003"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs", "step-0000001", "step-0000004"]


def test_default_prompts_are_dreambench_prompts_of_the_subjects_kind():
    for live, name in ((False, OBJECT_PROMPTS_FILE), (True, LIVE_PROMPTS_FILE)):
        listed = read_prompts(DEFAULT_BENCHMARK / name)
        assert len(validation.DEFAULT_PROMPTS[live]) == 4 and set(validation.DEFAULT_PROMPTS[live]) <= set(listed)
    assert validation.is_live("dog") and validation.is_live("Cat") and not validation.is_live("backpack")
    plan = validation.plan_validation(load_config(overrides=TINY), "dog", Path("photos"))
    assert plan.prompts[2] == "a dog wearing a red hat" and plan.photos == "photos"


def test_validation_settings_are_checked_and_change_the_finetune_key():
    def key(*overrides):
        return finetune_key(load_config(overrides=[*TINY, *overrides]), "dog", "d", "b")

    changed = [key("finetune.init_from=composites"), key("finetune.init_photos=3"), key("finetune.validate_every=10"),
               key("finetune.validation_prompts=['a {class} in the snow']"), key("finetune.validation_steps=2"),
               key("finetune.select=dino"), key("finetune.patience=2")]
    assert len({key(), *changed}) == 1 + len(changed)
    for bad, named in (("finetune.validate_every=0", "select"), ("finetune.patience=1 finetune.select=last", "patience"),
                       ("finetune.validation_prompts=['{class} in the snow']", "validation_prompts")):
        with pytest.raises(ConfigError, match=named):
            load_config(overrides=[*TINY, *bad.split()])
    load_config(overrides=[*TINY, "finetune.validate_every=0", "finetune.select=last"])  # no validation at all


def test_missing_scoring_models_are_an_error_before_training(tmp_path):
    overrides = [*TINY, f"finetune.subject={tmp_path}", f"models.dino={tmp_path / 'no-dino'}"]
    with pytest.raises(ConfigError, match=r"models.dino: .*no-dino.*finetune.validate_every=0"):
        check_finetune(load_config(overrides=overrides))
    check_finetune(load_config(overrides=[*overrides, "finetune.validate_every=0", "finetune.select=last"]))


def test_finetune_many_table_shows_the_chosen_step_and_scores():
    rows = [SubjectOutcome("dog", "ok", 1, 3.0, 2**20, "4", "", 0, 40, 0.7, 0.82, 0.295),
            SubjectOutcome("cat", "failed", 2, 1.0, 0, None, "boom")]
    table = format_table(rows).splitlines()
    assert table[0].split()[6:10] == ["step", "DINO", "CLIP-I", "CLIP-T"]
    assert table[1].split()[6:10] == ["40", "0.700", "0.820", "0.295"]
    assert table[2].split()[6:10] == ["-", "-", "-", "-"]


# ---------------------------------------------------------------------------------------------
# In a fine-tune (in process, MLflow's calls recorded instead of made)


@pytest.fixture
def mlflow_calls(monkeypatch):
    calls = {"metrics": [], "images": [], "tags": {}}
    monkeypatch.setattr(tracking, "resolve_tracking_uri", lambda *a, **k: "fake://")
    monkeypatch.setattr(tracking, "start_run", lambda *a, **k: "run-1")
    monkeypatch.setattr(tracking, "finish_run", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "log_params", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "log_dataset", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "last_metric_step", lambda *a, **k: -1)
    monkeypatch.setattr(tracking, "log_metrics", lambda uri, run, metrics, step: calls["metrics"].append((step, dict(metrics))))
    monkeypatch.setattr(tracking, "log_image", lambda uri, run, image, key, step: calls["images"].append((key, step, image.size)))
    monkeypatch.setattr(tracking, "set_tag", lambda uri, run, key, value: calls["tags"].__setitem__(key, value))
    return calls


@pytest.fixture(scope="module")
def subject_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    publish_dataset(root, {"dog": "dog"}, per_subject=2, size=(40, 32))
    return root


def _finetune(tmp_path, subject_data, *overrides):
    config = load_config(overrides=[*TINY, f"finetune.subject={subject_data}", f"train.storage_path={tmp_path / 'runs'}",
                                    f"finetune.out={tmp_path / 'out'}", *overrides])
    return finetune_subject(config, in_process=True)


def test_validation_runs_at_its_steps_and_logs_grids_and_scores(tmp_path, subject_data, mlflow_calls):
    result = _finetune(tmp_path, subject_data, "finetune.steps=3", "finetune.validate_every=2", "finetune.select=clip_t")
    [run_folder] = (tmp_path / "runs").iterdir()
    records = validation.read_records(run_folder)
    assert [r["step"] for r in records] == [2, 3]  # every 2 steps and at the end
    validated = [(step, sorted(m)) for step, m in mlflow_calls["metrics"] if any(k.startswith("validation/") for k in m)]
    assert validated == [(s, ["validation/clip_i", "validation/clip_t", "validation/dino"]) for s in (2, 3)]
    # A grid per validation: the subject's 2 photos over the 4 prompts' images, 32 px each.
    assert mlflow_calls["images"] == [("validation", s, (4 * 32, 2 * 32)) for s in (2, 3)]
    for r in records:
        assert all(-1.0 <= r[m] <= 1.0 for m in ("dino", "clip_i", "clip_t"))
    best = rank_records(records, "clip_t")[0]
    assert result.step == best["step"] and result.scores == {m: best[m] for m in ("dino", "clip_i", "clip_t")}
    assert mlflow_calls["tags"]["selected_step"] == str(best["step"])
    # A checkpoint at each validation, train.keep_checkpoints (2) of them kept.
    assert {p.name for p in run_folder.glob("step-*")} == {"step-0000002", "step-0000003"}


def test_early_stopping_stops_and_the_best_is_registered(tmp_path, subject_data, mlflow_calls, monkeypatch):
    planted = iter([0.50, 0.60, 0.55, 0.58, 0.90, 0.90])  # DINO per validation: the best at step 2

    class Planted:
        def __init__(self, *args):
            pass

        def score(self, images, prompts):
            return {"dino": next(planted), "clip_i": 0.5, "clip_t": 0.3}

    monkeypatch.setattr(validation, "Scorer", Planted)
    result = _finetune(tmp_path, subject_data, "finetune.steps=6", "finetune.validate_every=1", "finetune.select=dino",
                       "finetune.patience=2", "train.keep_checkpoints=1", "finetune.validation_prompts=['a {class} in the snow']")
    [run_folder] = (tmp_path / "runs").iterdir()
    assert [r["step"] for r in validation.read_records(run_folder)] == [1, 2, 3, 4]  # stopped after 2 without a new best
    assert json.loads((run_folder / "step-0000004" / "progress.json").read_text())["step"] == 4
    assert {p.name for p in run_folder.glob("step-*")} == {"step-0000002", "step-0000004"}  # newest and best, not 1 or 3
    assert result.step == 2 and result.scores == {"dino": 0.60, "clip_i": 0.5, "clip_t": 0.3}
    assert (tmp_path / "out" / "dog-textual-inversion" / "subject_embeds.safetensors").is_file()
