"""pipeline/cli.py: flags become --set overrides in one helper, and failures become exit codes
in one place (UserError 2, a failed job 1, both with the message on stderr)."""

import argparse

import pytest

from pipeline import cli
from pipeline.config import load_config
from pipeline.errors import JobFailed, UserError


def test_flag_overrides_writes_given_flags_as_json():
    args = argparse.Namespace(subject="123", gpu=True, steps=None, subjects=["yes", "b"])
    flags = {"subject": "finetune.subject", "gpu": "train.gpu", "steps": "finetune.steps", "subjects": "finetune.subjects",
             "missing": "finetune.out"}
    assert cli.flag_overrides(args, flags) == ['finetune.subject="123"', "train.gpu=true", 'finetune.subjects=["yes", "b"]']



@pytest.mark.parametrize("text", ["a dog 🐶", "𝔡𝔬𝔤", "nel\x85 ls\u2028 ps\u2029", "c1\x7f\x9f", 'tab\t "q" \\ud83d', "ctl\x01\x1f", "\\🐶"])
def test_flag_overrides_keep_any_utf8_text(text):
    # JSON's ASCII escapes write an emoji as a surrogate pair, "\ud83d\udc36", which YAML reads as
    # two lone surrogates: `generate --negative-prompt 🐶` was refused as "not UTF-8 text".
    # The other texts hold what YAML reads unlike JSON, were the escapes to change: a raw NEL or
    # line separator folds into a space, raw C1 controls are refused.
    flag = cli.flag_overrides(argparse.Namespace(negative_prompt=text), {"negative_prompt": "generate.negative_prompt"})
    assert load_config(overrides=flag).generate.negative_prompt == text

@pytest.mark.parametrize(("error", "code"), [(UserError("no such thing"), 2), (JobFailed("no usable photo"), 1)])
def test_main_maps_user_errors_to_2_and_failed_jobs_to_1(monkeypatch, capsys, error, code):
    def run(args, config):
        raise error

    monkeypatch.setattr("pipeline.commands.promote.run", run)
    assert cli.main(["promote", "m", "--alias", "a"]) == code
    assert capsys.readouterr().err == f"subjectforge: error: {error}\n"


def test_main_keeps_the_stack_trace_of_a_bug(monkeypatch):
    def run(args, config):
        raise KeyError("bug")

    monkeypatch.setattr("pipeline.commands.promote.run", run)
    with pytest.raises(KeyError):
        cli.main(["promote", "m", "--alias", "a"])


def test_a_command_flag_is_validated_with_the_config(capsys):
    assert cli.main(["serve", "--port", "0"]) == 2
    assert "serve.port" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "build", "--source", "src", "--out", ""],
        ["data", "refresh", "--source", "", "--out", "o"],
        ["data", "backgrounds", "--source", "src", "--out", " "],
        ["generate", "--prompt", "x", "--out", ""],
        ["edit", "--prompt", "a dog", "--replace", "dog", "--subject-image", "a.jpg", "--category", "cat", "--out", ""],
        ["demo", "--out", ""],
        ["finetune", "--out", ""],
        ["finetune-many", "--out", ""],
        ["evaluate", "--out", ""],
    ],
    ids=lambda argv: " ".join(argv[:2]),
)
def test_an_empty_folder_flag_is_a_usage_error_not_the_current_folder(argv, capsys, tmp_path, monkeypatch):
    # `--out "$OUT"` with OUT unset would write a dataset or images wherever the command ran
    # (here tmp_path: without the check, `demo --out ""` ran the whole demo there).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert "must not be empty" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["promote", "m", "--alias", "a b"], "--alias: 'a b' is not an alias name"),
        (["promote", "m", "--alias", "a.b"], "--alias: 'a.b' is not an alias name"),
        (["promote", "m", "--alias", "a@b"], "--alias: 'a@b' is not an alias name"),
        (["promote", "m", "--alias", "Latest"], "--alias: 'Latest' is reserved by MLflow's registry"),
        (["promote", "m", "--alias", "v3"], "--alias: 'v3' is reserved by MLflow's registry"),
        (["promote", "m", "--alias", "ok", "--from-alias", "x y"], "--from-alias: 'x y' is not an alias name"),
        (["promote", "m:1", "--alias", "ok"], "NAME: 'm:1' is not a registered model name"),
        (["promote", "m", "--alias", "ok", "--version", "v1"], "--version: 'v1' is not a version number"),
    ],
)
def test_promote_refuses_what_the_registry_would_before_opening_it(argv, named, monkeypatch, capsys):
    # MLflow refused a malformed alias only at set_alias, once the store was open.
    def opened(*args, **kwargs):
        raise AssertionError("the tracking store was opened")

    monkeypatch.setattr("pipeline.tracking.reachable_uri", opened)
    assert cli.main(argv) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    "source",
    ["set-alias", "file-alias", "set-deep"],
)
def test_a_config_that_nests_without_end_exits_2(tmp_path, capsys, source):
    # A YAML alias inside its own anchor (&a [*a]) is a list that holds itself, and a value
    # nested thousands deep exceeds Python's recursion: both were a RecursionError's stack trace.
    if source == "set-alias":
        config = ["--set", "generate.negative_prompt=&a [*a]"]
    elif source == "file-alias":
        (tmp_path / "c.yaml").write_text("generate:\n  negative_prompt: &a [*a]\n")
        config = ["--config", str(tmp_path / "c.yaml")]
    else:
        config = ["--set", "generate.negative_prompt=" + "[" * 5000 + "]" * 5000]
    assert cli.main(["promote", "m", "--alias", "a", *config]) == 2
    assert "nests too deeply" in capsys.readouterr().err


@pytest.mark.parametrize(
    "source, text, key",
    [
        ("file", "generate:\n  steps: 2\nprofile: tiny\ngenerate:\n  steps: 3\n", "'generate'"),
        ("file", "generate: {steps: 2, steps: 3}\n", "'steps'"),
        ("set", "generate={steps: 2, steps: 3}", "'steps'"),
    ],
)
def test_a_key_given_twice_in_yaml_exits_2_naming_it(tmp_path, capsys, source, text, key):
    # PyYAML keeps the last of two equal keys, so the first setting was dropped without a word.
    if source == "file":
        (tmp_path / "c.yaml").write_text(text)
        config, where = ["--config", str(tmp_path / "c.yaml")], "c.yaml"
    else:
        config, where = ["--set", text], "override generate"
    assert cli.main(["promote", "m", "--alias", "a", *config]) == 2
    err = capsys.readouterr().err
    assert f"duplicate key {key}" in err
    assert where in err


def _laughs(levels: int, key: str = "data:\n  filter:\n    exclude_prompts") -> str:
    """A "billion laughs" YAML: `levels` anchors of 10 aliases each, so 10**levels strings."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{key}: *l{levels - 1}\n"


@pytest.mark.parametrize("source", ["file", "set"])
def test_a_config_whose_aliases_expand_without_bound_exits_2(tmp_path, capsys, source):
    # A few lines of anchors expand to 10**levels values: every walk of the tree (the UTF-8
    # check, validation) took as long as that, and 9 levels hung the command for minutes.
    if source == "file":
        (tmp_path / "c.yaml").write_text(_laughs(6))
        config = ["--config", str(tmp_path / "c.yaml")]
    else:
        laughs = _laughs(6, "x").replace("\n", ", ")
        config = ["--set", f"data.filter.exclude_prompts={{{laughs[:-2]}}}"]
    assert cli.main(["promote", "m", "--alias", "a", *config]) == 2
    err = capsys.readouterr().err
    assert "aliases" in err and "100,000" in err


def test_a_config_of_a_few_aliases_loads():
    config = load_config(overrides=["data={filter: {exclude_prompts: &p [person, cat]}, backgrounds: {reject_prompts: *p}}"])
    assert config.data.filter.exclude_prompts == config.data.backgrounds.reject_prompts == ["person", "cat"]


@pytest.mark.parametrize("source", ["file", "set"])
def test_a_whole_number_longer_than_python_reads_exits_2(tmp_path, capsys, source):
    # Python refuses int() of more than 4300 digits: PyYAML's ValueError was a stack trace.
    if source == "file":
        (tmp_path / "c.yaml").write_text("generate:\n  steps: " + "9" * 5000 + "\n")
        config = ["--config", str(tmp_path / "c.yaml")]
    else:
        config = ["--set", "generate.steps=" + "9" * 5000]
    assert cli.main(["promote", "m", "--alias", "a", *config]) == 2
    assert "digits" in capsys.readouterr().err


def test_a_config_file_that_cannot_be_read_exits_2(capsys):
    # /proc/self/mem is a regular file whose read fails (EIO): an OSError stack trace.
    assert cli.main(["promote", "m", "--alias", "a", "--config", "/proc/self/mem"]) == 2
    assert "cannot read config file /proc/self/mem" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["finetune-many", "finetune"])
def test_a_missing_dataset_is_named_by_the_key_the_command_set(command, tmp_path, capsys):
    # finetune-many --data sets finetune.subject; its missing dataset was reported as train.data,
    # a key the user never set.
    argv = [command, "--profile", "tiny", "--data" if command == "finetune-many" else "--subject", str(tmp_path / "nowhere")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "finetune.subject" in err and "train.data" not in err, err
