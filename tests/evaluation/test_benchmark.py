"""The shipped DreamBench tables and prompt lists, and the names of the images to make."""

import pytest

from pipeline.config import BUNDLED_DATASETS_DIR, ConfigError
from pipeline.evaluation.benchmark import (
    build_tasks,
    load_subjects,
    prompt_slug,
    read_class_table,
    read_prompts,
)
from tests.imagefiles import png_header_only

BENCH = BUNDLED_DATASETS_DIR / "dreambench"
MINI = BUNDLED_DATASETS_DIR / "dreambench-mini"


def test_class_table_has_the_30_subjects_and_9_live_ones():
    table = read_class_table(BENCH / "subjects.csv")
    assert len(table) == 30
    live = sorted(s for s, (_, is_live) in table.items() if is_live)
    assert live == ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert table["bear_plushie"] == ("stuffed animal", False) and table["duck_toy"] == ("toy", False)
    # The bundled sample's own table agrees.
    for line in (MINI / "subjects.csv").read_text().splitlines()[1:]:
        subject, category = line.split(",")
        assert table[subject][0] == category


def test_prompt_lists_are_the_benchmarks_25_each():
    objects, live = read_prompts(BENCH / "prompts_object.txt"), read_prompts(BENCH / "prompts_live.txt")
    assert len(objects) == len(live) == 25
    assert objects[:10] == live[:10] and objects[-5:] == live[-5:]  # shared background and property prompts
    assert "a {class} with the Eiffel Tower in the background" in objects
    assert "a {class} wearing a black top hat and a monocle" in live
    source = (MINI / "prompts_and_classes.txt").read_text()
    for prompt in objects + live:
        assert f"'{prompt.replace('{class}', '{0} {1}')}'" in source


def test_subjects_and_tasks(tmp_path):
    table = read_class_table(BENCH / "subjects.csv")
    subjects = load_subjects(MINI, table, None)
    assert [s.subject_id for s in subjects] == sorted(p.name for p in MINI.iterdir() if p.is_dir())
    dog, teapot = load_subjects(MINI, table, ["dog", "teapot"])
    assert dog.live and not teapot.live and len(dog.photos) == 5 and dog.photos[0].endswith("dog/00.jpg")
    tasks = build_tasks([dog, teapot], {"dog": ["a {class} in the snow"], "teapot": ["a red {class}"]}, 2)
    assert [(t.subject_id, t.prompt, t.index, t.path) for t in tasks] == [
        ("dog", "a dog in the snow", 0, "images/dog/a-class-in-the-snow/0.png"),
        ("dog", "a dog in the snow", 1, "images/dog/a-class-in-the-snow/1.png"),
        ("teapot", "a red teapot", 0, "images/teapot/a-red-class/0.png"),
        ("teapot", "a red teapot", 1, "images/teapot/a-red-class/1.png"),
    ]


def test_bad_inputs_name_the_problem(tmp_path):
    table = read_class_table(BENCH / "subjects.csv")
    with pytest.raises(ConfigError, match="'unicorn' is not in the class table"):
        load_subjects(MINI, table, ["unicorn"])
    with pytest.raises(ConfigError, match="the list is empty"):
        load_subjects(MINI, table, [])
    with pytest.raises(ConfigError, match="no photos of 'dog2'"):
        load_subjects(MINI, table, ["dog2"])
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ConfigError, match="broken.jpg is not a readable image"):
        load_subjects(tmp_path, table, ["dog"])
    bad = tmp_path / "prompts.txt"
    bad.write_text("# comment\na {class} on the beach\n\nthe {class} in the snow\n")
    with pytest.raises(ConfigError, match=r"prompts.txt:4: a prompt must start with 'a '"):
        read_prompts(bad)
    bad.write_text("a {class} on the beach\na {class}, on the beach\n")
    with pytest.raises(ConfigError, match="repeats line 1"):
        read_prompts(bad)
    (tmp_path / "t.csv").write_text("subject_id,class\ndog,dog\n")
    with pytest.raises(ConfigError, match="missing column"):
        read_class_table(tmp_path / "t.csv")
    (tmp_path / "dog" / "broken.jpg").write_bytes(png_header_only(30000, 30000))  # past PIL's bomb guard
    with pytest.raises(ConfigError, match="broken.jpg is not a readable image"):
        load_subjects(tmp_path, table, ["dog"])
    bad.write_bytes(b"a {class} in a caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match="prompts.txt: not UTF-8 text"):
        read_prompts(bad)
    (tmp_path / "t.csv").write_bytes(b"subject_id,class,live\ndog,chien \xe0 poil,true\n")
    with pytest.raises(ConfigError, match="t.csv: not UTF-8 text"):
        read_class_table(tmp_path / "t.csv")


def test_prompt_slugs_are_file_names_and_stay_distinct():
    assert prompt_slug("a {class} on top of a purple rug in a forest") == "a-class-on-top-of-a-purple-rug-in-a-forest"
    long_a, long_b = "a {class} " + "very " * 30 + "tall", "a {class} " + "very " * 30 + "small"
    assert len(prompt_slug(long_a)) == 80 and prompt_slug(long_a) != prompt_slug(long_b)


def test_a_truncated_photo_is_refused_before_any_worker_starts(tmp_path):
    # Its header is whole, so the header check passed it, and the generator actor failed on it
    # with a Ray stack trace.
    from tests.imagefiles import jpeg_bytes, photo

    (tmp_path / "dog").mkdir()
    whole = jpeg_bytes(photo(0, (64, 64)))
    (tmp_path / "dog" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match="evaluate.photos: .*cut.jpg is not a readable image"):
        load_subjects(tmp_path, read_class_table(BENCH / "subjects.csv"), ["dog"])


@pytest.mark.parametrize("make", ["fifo", "folder", "dangling link"])
def test_a_photo_name_that_is_not_a_file_stops_the_job_naming_it(tmp_path, make):
    # It was left out without a word, so the subject was scored against fewer photos than it has.
    import os

    from tests.imagefiles import jpeg_bytes, photo

    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "00.jpg").write_bytes(jpeg_bytes(photo(0, (64, 64))))
    odd = tmp_path / "dog" / "01.jpg"
    {"fifo": os.mkfifo, "folder": os.mkdir, "dangling link": lambda p: p.symlink_to(tmp_path / "gone.jpg")}[make](odd)
    with pytest.raises(ConfigError, match=r"evaluate.photos: .*dog/01.jpg is not a regular file"):
        load_subjects(tmp_path, read_class_table(BENCH / "subjects.csv"), ["dog"])
