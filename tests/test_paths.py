"""Deleting and replacing folders only inside their output root."""

import os
import shutil

import pytest

from pipeline import paths
from pipeline.errors import UserError


def _folder(path, text="x"):
    path.mkdir(parents=True)
    (path / "keep.txt").write_text(text)
    return path


@pytest.mark.parametrize("name", ["../victim", "..", ".", "sub/../../victim"])
def test_remove_tree_refuses_paths_that_leave_the_root(tmp_path, name):
    root, victim = _folder(tmp_path / "out"), _folder(tmp_path / "victim")
    with pytest.raises(paths.OutsideRootError, match="not inside"):
        paths.remove_tree(root / name, root)
    with pytest.raises(paths.OutsideRootError):
        paths.remove_tree(victim, root)  # an absolute path elsewhere
    assert (victim / "keep.txt").is_file() and (root / "keep.txt").is_file()


def test_remove_tree_deletes_inside_and_a_link_never_its_target(tmp_path):
    root, victim = _folder(tmp_path / "out"), _folder(tmp_path / "victim")
    _folder(root / "a" / "b")
    paths.remove_tree(root / "a", root)
    assert not (root / "a").exists()
    paths.remove_tree(root / "missing", root)  # nothing to do
    (root / "link").symlink_to(victim)
    paths.remove_tree(root / "link", root)
    assert not (root / "link").exists() and (victim / "keep.txt").is_file()
    (root / "via").symlink_to(tmp_path)  # a folder inside reached through a link that leads out
    with pytest.raises(paths.OutsideRootError):
        paths.remove_tree(root / "via" / "victim", root)
    assert (victim / "keep.txt").is_file()


def test_replace_tree_keeps_the_old_folder_when_the_copy_fails(tmp_path, monkeypatch):
    root, new = _folder(tmp_path / "out"), _folder(tmp_path / "new", "new")
    dst = _folder(root / "dog-lora", "old")

    def copy_then_fail(src, dst, **kwargs):
        dst.mkdir()
        (dst / "half").write_text("")
        raise OSError("No space left on device")

    monkeypatch.setattr(shutil, "copytree", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        paths.replace_tree(new, dst, root)
    assert (dst / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    assert paths.replace_tree(new, dst, root) == dst
    assert (dst / "keep.txt").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["dog-lora", "keep.txt"]  # no partial or old copy left, and no lock file


def test_replace_tree_restores_a_folder_left_aside_between_the_renames(tmp_path):
    root, new = _folder(tmp_path / "out"), _folder(tmp_path / "new", "new")
    _folder(root / "dog-lora.old", "old")  # a crash after moving the old folder aside
    paths.replace_tree(new, root / "dog-lora", root)
    assert (root / "dog-lora" / "keep.txt").read_text() == "new" and not (root / "dog-lora.old").exists()
    with pytest.raises(paths.OutsideRootError):
        paths.replace_tree(new, tmp_path / "victim", root)


def test_two_replacements_of_one_folder_at_once_leave_a_whole_one(tmp_path, monkeypatch):
    # Two fine-tunes of one subject finishing together (a retried job beside the first) shared
    # dog-lora.partial: the second deleted and refilled it while the first was copying, and the
    # first renamed the half it had copied since into place.
    import threading

    root = _folder(tmp_path / "out")
    first, second = _folder(tmp_path / "first", "first"), _folder(tmp_path / "second", "second")
    for i in range(3):
        (first / f"weights-{i}").write_text("first")
        (second / f"weights-{i}").write_text("second")
    dst = root / "dog-lora"
    copy = shutil.copytree
    second_done = threading.Event()

    def first_copies_slowly(src, to, **kwargs):
        if src != first:
            return copy(src, to, **kwargs)
        to.mkdir()
        shutil.copy(src / "keep.txt", to / "keep.txt")
        threading.Thread(target=lambda: (paths.replace_tree(second, dst, root), second_done.set())).start()
        second_done.wait(timeout=1)  # the other job's whole replacement, when nothing holds it back
        for name in sorted(p.name for p in src.iterdir() if not (to / p.name).exists()):
            shutil.copy(src / name, to / name)
        return to

    monkeypatch.setattr(shutil, "copytree", first_copies_slowly)
    paths.replace_tree(first, dst, root)
    assert second_done.wait(timeout=10)
    contents = {p.name: p.read_text() for p in dst.iterdir()}
    assert sorted(contents) == ["keep.txt", "weights-0", "weights-1", "weights-2"]
    assert len(set(contents.values())) == 1  # one job's folder, whole
    assert not (root / ".dog-lora.lock").exists()  # each holder deletes the lock file it held


def test_check_output_folder_proves_the_folder_writable_and_leaves_nothing(tmp_path):
    paths.check_output_folder(tmp_path / "a" / "b")
    assert not any(tmp_path.iterdir())
    with pytest.raises(UserError, match="--out /proc/x: cannot write in /proc"):
        paths.check_output_folder("/proc/x")  # root included, whom os.access lets write there


def test_a_link_planted_as_the_replacement_lock_writes_nothing_where_it_points(tmp_path):
    """replace_tree's lock beside its folder is opened without following a link: a planted
    .<name>.lock -> a file elsewhere was opened there, and made there when it was missing."""
    root, new = tmp_path / "out", _folder(tmp_path / "new")
    root.mkdir()
    made_elsewhere, existing = tmp_path / "made-here", tmp_path / "victim.txt"
    existing.write_text("keep")
    for target in (made_elsewhere, existing):
        (root / ".dog-lora.lock").symlink_to(target)
        assert paths.replace_tree(new, root / "dog-lora", root) == root / "dog-lora"
        assert (root / "dog-lora" / "keep.txt").read_text() == "x"
        assert not os.path.lexists(root / ".dog-lora.lock")  # the link removed, the lock file gone with the holder
    assert not made_elsewhere.exists() and existing.read_text() == "keep"


def test_a_folder_where_the_replacement_lock_goes_is_a_clear_error(tmp_path):
    root, new = tmp_path / "out", _folder(tmp_path / "new")
    (root / ".dog-lora.lock").mkdir(parents=True)
    with pytest.raises(UserError, match="not a regular file"):
        paths.replace_tree(new, root / "dog-lora", root)
