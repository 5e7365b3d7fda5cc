import argparse

import pytest
import yaml

from pipeline import cli
from pipeline.config import (
    PROFILE_MODELS,
    Config,
    ConfigError,
    UniqueKeyLoader,
    dump_config,
    load_config,
    parse_override,
)


def test_defaults_are_valid_and_profile_picks_models():
    config = load_config()
    assert config.profile == "real"  # never random weights unless asked for
    assert config.model_path("clipseg") == "CIDAS/clipseg-rd64-refined"
    tiny = load_config(overrides=["profile=tiny"])
    assert tiny.model_path("clipseg") == PROFILE_MODELS["tiny"]["clipseg"]
    real = load_config(overrides=["profile=real"])
    assert real.model_path("clipseg") == "CIDAS/clipseg-rd64-refined"
    explicit = load_config(overrides=["profile=real", "models.clipseg=/models/clipseg"])
    assert explicit.model_path("clipseg") == "/models/clipseg"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  trimap:\n    low: 0.1\n    high: 0.7\n  composite:\n    per_photo: 3\n")
    config = load_config(path, ["data.trimap.low=0.25", "data.write.image_format=png"])
    assert config.data.trimap.low == 0.25 and config.data.trimap.high == 0.7
    assert config.data.composite.per_photo == 3 and config.data.write.image_format == "png"


def test_override_values_are_typed():
    assert parse_override("a.b=0.2") == (["a", "b"], 0.2)
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=text with spaces") == (["a"], "text with spaces")
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")


@pytest.mark.parametrize(
    "override, key",
    [
        ("data.trimap.lowx=0.1", "data.trimap.lowx"),
        ("data.trimap.low=banana", "data.trimap.low"),
        ("data.composite.per_photo=0", "data.composite.per_photo"),
        ("data.trimap.low=0.9", "data.trimap"),  # low above high: cross-field rule
        ("data.filter.min_area=0.99", "data.filter"),
        ("profile=huge", "profile"),
        ("data.segment.prompt_template=a photo", "data.segment"),
        ("data.segment.num_actors=0", "data.segment"),
        ("data.segment.batch_size=many", "data.segment.batch_size"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert f"{key}" in str(info.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lr=inf", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("finetune.lr=inf", "finetune.lr"),
        ("train.noise_offset=inf", "train.noise_offset"),
        ("train.max_grad_norm=inf", "train.max_grad_norm"),
        ("train.snr_gamma=inf", "train.snr_gamma"),
        ("data.trimap.low=nan", "data.trimap.low"),
    ],
)
def test_an_infinite_or_nan_number_is_an_error_naming_the_key(override, key):
    # train.lr=inf passed its gt=0 bound and trained every weight to NaN with exit 0.
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])


def test_a_subject_named_twice_in_finetune_subjects_is_an_error_naming_it():
    # finetune-many --subjects dog,dog,cat trained dog twice at once, two actors writing one
    # subject folder and registering two versions.
    with pytest.raises(ConfigError, match="finetune.subjects: .*dog.* more than once"):
        load_config(overrides=["finetune.subjects=[dog, cat, dog]"])


@pytest.mark.parametrize("alias", ["a@b", "a b", "a.b", "", "a" * 256])
def test_an_alias_mlflow_refuses_is_a_config_error(alias):
    # MLflow's set_alias refused it only after the fine-tune had run.
    with pytest.raises(ConfigError, match="finetune.alias: .*is not an alias name"):
        load_config(overrides=[f"finetune.alias='{alias}'"])


def test_a_finetune_alias_flag_mlflow_refuses_exits_2_before_training(capsys):
    assert cli.main(["finetune", "--alias", "a@b"]) == 2
    assert "finetune.alias: Value error, 'a@b' is not an alias name" in capsys.readouterr().err


@pytest.mark.parametrize("alias", ["latest", "LATEST", "v1", "V12"])
def test_an_alias_mlflow_keeps_for_itself_is_a_config_error(alias):
    # MLflow's set_alias refuses these names (reserved), again only after the fine-tune had run.
    with pytest.raises(ConfigError, match="finetune.alias: .*is reserved"):
        load_config(overrides=[f"finetune.alias={alias}"])


@pytest.mark.parametrize("alias", ["champion", "v2-rc_1", "état", "latest2", "v"])
def test_aliases_mlflow_accepts_load(alias):
    assert load_config(overrides=[f"finetune.alias={alias}"]).finetune.alias == alias


def test_yaml_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    # Something else at the path is named as what it is, not as missing.
    with pytest.raises(ConfigError, match=r"config file .* is a folder, not a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"config file /dev/zero is not a regular file"):
        load_config("/dev/zero")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"data:\n  caption:\n    prompt: caf\xe9\n")  # saved as Latin-1, not UTF-8
    with pytest.raises(ConfigError, match="latin1.yaml is not valid YAML"):
        load_config(latin1)


@pytest.mark.parametrize("key", ["evaluate.out", "evaluate.photos", "generate.negative_prompt", "data.filter.exclude_prompts"])
def test_a_nul_character_in_any_setting_is_an_error_naming_the_key(key):
    # YAML's "\0" escape puts one in: evaluate.out and evaluate.photos ended in os.path's
    # "embedded null byte" ValueError stack trace; no setting, path or text, takes one.
    value = '["a\\0b"]' if key == "data.filter.exclude_prompts" else '"a\\0b"'
    with pytest.raises(ConfigError, match=f"{key}.*NUL"):
        load_config(overrides=[f"{key}={value}"])


def test_text_that_is_not_utf8_is_an_error_naming_the_key():
    # `--category $'chi\xe9n'` from a Latin-1 terminal: Python keeps the byte as a surrogate,
    # which the tokenizer (in a Ray worker, after the data work) and MLflow refuse.
    flag = cli.flag_overrides(argparse.Namespace(category="chi\udce9n"), {"category": "finetune.category"})
    with pytest.raises(ConfigError, match=r"finetune.category: not UTF-8 text \('chi\\\\udce9n'\)"):
        load_config(overrides=flag)
    with pytest.raises(ConfigError, match=r"data.filter.exclude_prompts.1: not UTF-8 text"):
        load_config(overrides=['data.filter.exclude_prompts=["person", "caf\\udce9"]'])


def test_yaml_merge_keys_may_be_overridden(tmp_path):
    # A key after `<<: *anchor` overrides the merged one: not a key given twice.
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {steps: 2, seed: 5}\ngenerate:\n  <<: *b\n  steps: 3\n")
    tree = yaml.load(merged.read_text(), Loader=UniqueKeyLoader)
    assert tree["generate"] == {"steps": 3, "seed": 5}
    nested = "a: &a {x: 1}\nb: &b {<<: *a, x: 2}\nc: {<<: *b, x: 3}\n"
    assert yaml.load(nested, Loader=UniqueKeyLoader) == {"a": {"x": 1}, "b": {"x": 2}, "c": {"x": 3}}
    # b's keys are merged into c before b itself is built (it is nested deeper): still one x each.
    deeper = "a: &a {x: 1}\nd: {b: &b {<<: *a, x: 2}}\nc: {<<: *b, x: 3}\n"
    assert yaml.load(deeper, Loader=UniqueKeyLoader) == {"a": {"x": 1}, "d": {"b": {"x": 2}}, "c": {"x": 3}}


def test_a_key_given_twice_is_a_config_error(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("data:\n  decode:\n    size: 256\n    size: 512\n")
    with pytest.raises(ConfigError, match=r"twice.yaml .*duplicate key 'size'.*line 3"):
        load_config(twice)
    with pytest.raises(ConfigError, match=r"override generate: .*duplicate key 'steps'"):
        parse_override("generate={steps: 2, steps: 3}")


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value"):
        load_config(overrides=["profile=tiny", "profile.x=1"])


def test_dump_reloads_to_the_same_config(tmp_path):
    config = load_config(overrides=["data.trimap.low=0.05", "data.decode.size=256"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text())["data"]["decode"]["size"] == 256
    assert isinstance(config, Config)


def test_profile_settings_sit_under_the_users_own():
    tiny = load_config(overrides=["profile=tiny"])
    assert tiny.data.segment.normalize == "minmax" and tiny.data.trimap.erode_bg_px == 0
    mine = load_config(overrides=["profile=tiny", "data.trimap.erode_bg_px=4"])
    assert mine.data.trimap.erode_bg_px == 4 and mine.data.segment.normalize == "minmax"
    real = load_config()
    assert real.data.segment.normalize == "none" and real.data.trimap.erode_bg_px == 6
    assert (tiny.train.resolution, real.train.resolution) == (64, 512)
    assert load_config(overrides=["profile=tiny", "train.resolution=128"]).train.resolution == 128


def test_clipseg_actors_and_batch_follow_the_gpus_unless_set():
    """auto: one CLIPSeg actor at batch 8 without GPUs (CI, the demo), three per GPU at batch 32
    with them (they take ~2.5 actors' time beside a GPU's matting actors); a number wins."""
    segment = load_config().data.segment
    assert [segment.resolved(gpus) for gpus in (0, 0.5, 1, 2)] == [(1, 8), (3, 32), (3, 32), (6, 32)]
    mine = load_config(overrides=["data.segment.num_actors=2", "data.segment.batch_size=4"]).data.segment
    assert mine.resolved(0) == mine.resolved(4) == (2, 4)


def test_captioner_actors_batch_and_share_follow_the_gpus_unless_set():
    """auto: one captioner at batch 8 on the CPU without GPUs, two per GPU at batch 64 and 0.125
    of a GPU each with them (one actor per GPU capped the build at 124 photos/s, under the 150
    asked for: BENCHMARKS.md, "Caption stage"); a number wins."""
    caption = load_config().data.caption
    assert [caption.resolved(gpus) for gpus in (0, 0.5, 1, 4)] == [(1, 8, 0.0), (2, 64, 0.125), (2, 64, 0.125), (8, 64, 0.125)]
    assert load_config(overrides=["profile=tiny"]).data.caption.resolved(0) == (1, 8, 0.0)
    mine = load_config(overrides=["data.caption.num_actors=1", "data.caption.batch_size=4", "data.caption.num_gpus=0.25"]).data.caption
    assert mine.resolved(0) == mine.resolved(4) == (1, 4, 0.25)


def test_a_blip_captioner_gets_one_actor_per_gpu_and_blip2_two():
    """auto by the captioner's family (its config.json's model_type): on an H100 a BLIP captioner
    built faster with one actor per GPU than with two (each process takes GPU time from matting),
    BLIP-2 OPT-2.7B with two than with one (one capped the build): BENCHMARKS.md "Caption stage"."""
    caption = load_config().data.caption
    assert [caption.resolved(gpus, "blip") for gpus in (0, 1, 4)] == [(1, 8, 0.0), (1, 64, 0.125), (4, 64, 0.125)]
    assert caption.resolved(1, "blip-2") == caption.resolved(1, None) == (2, 64, 0.125)
    assert load_config(overrides=["data.caption.num_actors=3"]).data.caption.resolved(1, "blip") == (3, 64, 0.125)


@pytest.mark.parametrize(
    "scaling, workers, grad_accum, rate",
    [("none", 8, 1, 2e-6), ("linear", 8, 1, 3.2e-5), ("sqrt", 8, 1, 8e-6), ("linear", 1, 1, 4e-6), ("sqrt", 2, 4, 8e-6)],
)
def test_lr_scaling_gives_the_documented_rates(scaling, workers, grad_accum, rate):
    """train.lr is given for reference_batch (16) samples per step; the run's are batch_size x
    workers x grad_accum (32 x 8 = 256 on the cluster: 16 times the paper's)."""
    train = load_config(
        overrides=["train.batch_size=32", f"train.workers={workers}", f"train.grad_accum={grad_accum}", f"train.lr_scaling={scaling}"]
    ).train
    assert train.learning_rate() == pytest.approx(rate, rel=1e-12)
    assert load_config(overrides=["train.lr_scaling=linear"]).train.learning_rate() == 2e-6  # 16 per step: the paper's
    assert load_config(overrides=["train.lr_scaling=linear", "train.reference_batch=32"]).train.learning_rate() == 1e-6


def test_a_fine_tune_keeps_its_methods_learning_rate_under_lr_scaling(tmp_path):
    from pipeline.train.finetune import training_config

    config = load_config(overrides=["profile=tiny", "finetune.subject_id=dog", "train.lr_scaling=linear", "train.workers=8"])
    train = training_config(config, tmp_path, "base", "run").train
    assert train.learning_rate() == config.finetune.learning_rate()


def test_cluster_pretraining_states_its_lr_scaling():
    from pipeline.config import CONFIGS_DIR

    # infra/rayjob-pretrain.yaml runs it with --workers 8.
    train = load_config(CONFIGS_DIR / "cluster-pretrain.yaml", ["train.workers=8"]).train
    assert train.batch_size * train.workers * train.grad_accum == 256 and train.steps * 256 == 500_000 * 16
    assert (train.lr_scaling, train.reference_batch) == ("sqrt", 16)
    assert train.learning_rate() == pytest.approx(8e-6)


def test_a_finetune_category_longer_than_a_class_noun_is_an_error_naming_the_key():
    # generate, edit and the server refuse a class noun over MAX_CATEGORY_CHARS; a fine-tune took
    # any length, trained with it and registered it as the subject's class noun.
    from pipeline.config import MAX_CATEGORY_CHARS

    with pytest.raises(ConfigError, match="finetune.category"):
        load_config(overrides=[f"finetune.category={'d' * (MAX_CATEGORY_CHARS + 1)}"])
    assert load_config(overrides=[f"finetune.category={'d' * MAX_CATEGORY_CHARS}"]).finetune.category == "d" * MAX_CATEGORY_CHARS
