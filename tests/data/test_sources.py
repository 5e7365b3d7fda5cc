import hashlib
import os
from pathlib import Path

import pytest

from pipeline.data import sources
from pipeline.data.sources import SourceError, read_captions_csv, read_subjects_csv, scan_source, sha256_file
from tests.imagefiles import jpeg_bytes, make_source, photo


def test_sha256_matches_hashlib(tmp_path):
    path = tmp_path / "x.bin"
    data = bytes(range(256)) * 5000  # spans several read chunks
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    "text, match",
    [
        ("subject,category\ndog,dog\n", "missing column"),
        ("subject_id,category\ndog,\n", "line 2"),
        ("subject_id,category\ndog,dog\ndog,cat\n", "duplicate subject_id 'dog'"),
        ("subject_id,category\n", "lists no subjects"),
        ("subject_id,category\n../x,dog\n", "plain folder name"),
        # Each id becomes a registered model's name (subjectforge-<id>), which MLflow refuses with a
        # ':'; a fine-tune of such a subject failed at registration, after its training.
        ("subject_id,category\nrex:1,dog\n", r"line 2: subject_id 'rex:1' must be a plain folder name"),
        ('subject_id,category\n"re\nx",dog\n', r"line 2: subject_id 're\\nx' must be a plain folder name"),
        # A class noun as long as a paragraph went into every prompt and the registered subject.
        ("subject_id,category\nrex," + "d" * 101 + "\n", "line 2: category of at most 100 characters"),
        # A quoted line break or a control byte went into every prompt, CLIPSeg's and the model's.
        ('subject_id,category\nrex,"dog\nbig"\n', r"line 2: category 'dog\\nbig' holds a control character"),
        ("subject_id,category\nrex,\x00dog\n", r"line 2: category '\\x00dog' holds a control character"),
        ('subject_id,category\nrex,"small\tdog"\n', r"line 2: category 'small\\tdog' holds a control character"),
    ],
)
def test_bad_subjects_csv_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "subjects.csv").write_text(text)
    with pytest.raises(SourceError, match=match):
        read_subjects_csv(tmp_path / "subjects.csv")


@pytest.mark.parametrize("reader, name, header", [(read_subjects_csv, "subjects.csv", b"subject_id,category"),
                                                  (read_captions_csv, "captions.csv", b"photo,caption")])
@pytest.mark.parametrize("row, match", [
    (b"dog,caf\xe9 \xff\n", "not UTF-8 text"),  # Latin-1 bytes
    (b"dog/a.jpg," + b"x" * 200_000 + b"\n", "line 2: malformed row: field larger than field limit"),
])
def test_csv_files_that_are_not_utf8_or_malformed_are_clear_errors(tmp_path, reader, name, header, row, match):
    """Before: a UnicodeDecodeError or csv.Error stack trace from the data build."""
    (tmp_path / name).write_bytes(header + b"\n" + row)
    with pytest.raises(SourceError, match=match):
        reader(tmp_path / name)


@pytest.mark.parametrize("reader, name, header", [(read_subjects_csv, "subjects.csv", "subject_id,category"),
                                                  (read_captions_csv, "captions.csv", "photo,caption")])
@pytest.mark.parametrize("rows, match", [
    ('"dog,dog\n', r"line 2: unterminated quote"),  # before: read as one field "dog,dog\n"
    ('dog,dog\n"dog/a.jpg,x\ny,z\n', r"line 3: unterminated quote"),  # the quote opens the row of line 3
    ("dog,dog,x\n", r"line 2: 3 fields, but the header has 2"),  # before: the third field was dropped
])
def test_csv_quirks_are_errors_naming_file_and_line(tmp_path, reader, name, header, rows, match):
    (tmp_path / name).write_text(f"{header}\n{rows}")
    with pytest.raises(SourceError, match=f"{name} {match}"):
        reader(tmp_path / name)


@pytest.mark.parametrize("reader, name", [(read_subjects_csv, "subjects.csv"), (read_captions_csv, "captions.csv")])
def test_a_csv_that_cannot_be_read_is_a_clear_error(tmp_path, monkeypatch, reader, name):
    # Before: a PermissionError stack trace from the data build (root reads anything, so the
    # refusal is made by hand).
    (tmp_path / name).write_text("x,y\n")

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources, "open", refuse, raising=False)
    with pytest.raises(SourceError, match=f"{name}: cannot read it: Permission denied"):
        reader(tmp_path / name)


def test_a_source_folder_that_cannot_be_listed_is_a_clear_error(tmp_path, monkeypatch):
    root = make_source(tmp_path / "locked", {"dog": "dog"}, per_subject=1)  # its subjects.csv can be read
    _locked(monkeypatch, "locked")
    with pytest.raises(SourceError, match=r"locked: cannot list the source folder: Permission denied"):
        scan_source(root)


def test_a_captions_csv_that_is_not_a_file_is_an_error_not_ignored(tmp_path):
    # Before: a folder (or FIFO) named captions.csv was taken for no captions.csv: every
    # caption the user wrote was silently left to the captioner.
    (tmp_path / "captions.csv").mkdir()
    with pytest.raises(SourceError, match=r"captions.csv is not a regular file"):
        read_captions_csv(tmp_path / "captions.csv")


@pytest.mark.parametrize("caption, shown", [("a dog\x00 asleep", r"'\\x00'"), ("a dog\x1b[31m asleep", r"'\\x1b'"),
                                             ("a dog\x7f asleep", r"'\\x7f'"), ("a dog\x1f asleep", r"'\\x1f'")])
def test_a_caption_with_a_control_character_is_a_clear_error(tmp_path, caption, shown):
    # Before: a NUL or an escape sequence was kept and went into the photo's training prompt.
    (tmp_path / "captions.csv").write_text(f'photo,caption\ndog/a.jpg,"a dog"\ndog/b.jpg,"{caption}"\n')
    with pytest.raises(SourceError, match=rf"captions.csv line 3: caption holds a control character {shown}"):
        read_captions_csv(tmp_path / "captions.csv")


def test_caption_line_breaks_and_tabs_are_folded_into_spaces(tmp_path):
    (tmp_path / "captions.csv").write_text('photo,caption\ndog/a.jpg,"a dog\r\n asleep\ton a  sofa "\n')
    assert read_captions_csv(tmp_path / "captions.csv") == {"dog/a.jpg": "a dog asleep on a sofa"}


def test_csv_unknown_columns_are_named(tmp_path):
    """Before: an extra column (`notes`) was read and ignored; the README documents none."""
    (tmp_path / "subjects.csv").write_text("subject_id,category,notes,live\nrex,dog,good boy,1\n")
    with pytest.raises(SourceError, match=r"subjects.csv: unknown column\(s\) notes, live; the columns are subject_id,category"):
        read_subjects_csv(tmp_path / "subjects.csv")


def test_csv_column_named_twice_is_named(tmp_path):
    """Before: DictReader kept the second `category` ("cat") and dropped the first without a word."""
    (tmp_path / "subjects.csv").write_text("subject_id,category,category\nrex,dog,cat\n")
    with pytest.raises(SourceError, match=r"subjects.csv: column\(s\) category named twice in the header"):
        read_subjects_csv(tmp_path / "subjects.csv")


def test_missing_subjects_csv_and_missing_folder(tmp_path):
    with pytest.raises(SourceError, match="not found"):
        scan_source(tmp_path / "nope")
    with pytest.raises(SourceError, match="subjects.csv"):
        scan_source(tmp_path)


def test_scan_accounts_for_every_file(tmp_path):
    root = make_source(tmp_path / "src", {"dog": "dog", "ghost": "ghost", "empty": "cup"}, per_subject=2)
    (root / "ghost").rmdir()
    (root / "dog" / "my photo é.jpg").write_bytes(jpeg_bytes(photo()))
    (root / "dog" / "nested").mkdir()
    (root / "dog" / "nested" / "deep.jpg").write_bytes(jpeg_bytes(photo(1)))
    (root / "dog" / ".DS_Store").write_bytes(b"junk")
    (root / "stray").mkdir()
    (root / "stray" / "x.jpg").write_bytes(jpeg_bytes(photo(2)))
    (root / "README.md").write_text("about these photos")
    (root / "loose.jpg").write_bytes(jpeg_bytes(photo(3)))

    scan = scan_source(root)
    uris = sorted(p.source_uri for p in scan.photos)
    assert uris == ["dog/00.jpg", "dog/01.jpg", "dog/my photo é.jpg", "dog/nested/deep.jpg"]
    assert all(p.category == "dog" and p.subject_id == "dog" for p in scan.photos)
    assert [(p.source_uri, reason) for p, reason in scan.rejects] == [
        ("stray/x.jpg", "subject folder 'stray' is not listed in subjects.csv")
    ]
    assert len(scan.inputs) == 5
    text = "\n".join(scan.warnings)
    assert "'ghost' but the source has no folder" in text
    assert "loose.jpg" in text and "README" not in text
    assert "1 hidden file" in text
    assert "subject 'empty' has no photos" in text


def test_digest_tracks_content_and_category(tmp_path):
    root = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=2)
    first = scan_source(root).digest()
    assert scan_source(root).digest() == first
    (root / "dog" / "00.jpg").write_bytes(jpeg_bytes(photo(9)))
    second = scan_source(root).digest()
    assert second != first
    (root / "subjects.csv").write_text("subject_id,category\ndog,puppy\n")
    assert scan_source(root).digest() != second


def test_copies_are_rejects_naming_the_first_photo_in_path_order(tmp_path):
    root = make_source(tmp_path / "src", {"cat": "cat", "dog": "dog"}, sample=False)
    for uri, seed in (("cat/a.jpg", 1), ("dog/b.jpg", 1), ("dog/c.jpg", 2), ("dog/nested/a.jpg", 2), ("dog/d.jpg", 3)):
        (root / uri).parent.mkdir(exist_ok=True)
        (root / uri).write_bytes(jpeg_bytes(photo(seed)))
    kept = scan_source(root, duplicates="keep")
    scan = scan_source(root, duplicates="reject")
    assert sorted(p.source_uri for p in scan.photos) == ["cat/a.jpg", "dog/c.jpg", "dog/d.jpg"]
    assert sorted(_reject_reasons(scan).items()) == [
        ("dog/b.jpg", "duplicate of cat/a.jpg (same bytes)"), ("dog/nested/a.jpg", "duplicate of dog/c.jpg (same bytes)")
    ]
    assert len(kept.photos) == 5 and not kept.rejects and len(scan.inputs) == 5
    # The verdicts are part of the source's digest, so switching data.duplicates is no "nothing changed".
    assert scan.digest() != kept.digest()
    (root / "dog" / "b.jpg").unlink()
    (root / "dog" / "nested" / "a.jpg").unlink()
    assert scan_source(root, duplicates="reject").digest() == scan_source(root, duplicates="keep").digest()


def _reject_reasons(scan):
    return {photo.source_uri: reason for photo, reason in scan.rejects}


def test_links_leaving_the_source_are_rejects_unless_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_bytes(photo(4)))
    root = make_source(tmp_path / "src", {"dog": "dog", "rex": "dog"}, per_subject=1)
    (root / "rex").rmdir()
    (root / "rex").symlink_to(outside, target_is_directory=True)
    (root / "dog" / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "dog" / "inside.jpg").symlink_to(root / "dog" / "00.jpg")  # stays in the source: followed

    # Copies kept: this test is about links (the link inside is a copy of dog/00.jpg's bytes).
    scan = scan_source(root, duplicates="keep")
    assert _reject_reasons(scan) == {"rex": "link outside the source", "dog/leak.jpg": "link outside the source"}
    # Nothing outside the source is read: its rejects carry no hash.
    assert all(photo.sha256 == "" for photo, _ in scan.rejects)
    assert sorted(p.source_uri for p in scan.photos) == ["dog/00.jpg", "dog/inside.jpg"]
    assert len(scan.inputs) == 4

    followed = scan_source(root, follow_links=True, duplicates="keep")
    assert followed.rejects == []
    assert sorted(p.source_uri for p in followed.photos) == ["dog/00.jpg", "dog/inside.jpg", "dog/leak.jpg", "rex/secret.jpg"]


def test_dangling_links_loops_and_fifos_are_reject_rows(tmp_path):
    root = make_source(tmp_path / "src", {"dog": "dog"}, per_subject=1)
    dog = root / "dog"
    (dog / "gone.jpg").symlink_to(tmp_path / "nothing-here.jpg")
    (dog / "a.jpg").symlink_to(dog / "b.jpg")
    (dog / "b.jpg").symlink_to(dog / "a.jpg")
    (dog / "nested").mkdir()
    (dog / "nested" / "up").symlink_to(dog, target_is_directory=True)  # a folder loop
    os.mkfifo(dog / "pipe.jpg")

    scan = scan_source(root)  # must not hang on the FIFO or recurse forever
    reasons = _reject_reasons(scan)
    assert set(reasons) == {"dog/gone.jpg", "dog/a.jpg", "dog/b.jpg", "dog/nested/up", "dog/pipe.jpg"}
    assert reasons["dog/gone.jpg"] == "dangling link"
    assert reasons["dog/a.jpg"] == reasons["dog/b.jpg"] == "link loop"
    assert reasons["dog/nested/up"] == "link loop"
    assert reasons["dog/pipe.jpg"] == "not a regular file (fifo)"
    assert [p.source_uri for p in scan.photos] == ["dog/00.jpg"]
    assert len(scan.inputs) == len(scan.photos) + len(scan.rejects) == 6


def _locked(monkeypatch, name: str) -> None:
    """Folders called `name` cannot be listed, as a folder without read permission is for
    anyone but root (these tests may run as root, whom chmod does not stop)."""
    iterdir = Path.iterdir

    def listing(self):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", listing)


def test_a_folder_that_cannot_be_listed_is_a_reject_row(tmp_path, monkeypatch):
    # Before: a PermissionError stack trace from the scan, the whole build lost to one folder.
    root = make_source(tmp_path / "src", {"dog": "dog", "cat": "cat"}, per_subject=1)
    (root / "dog" / "locked").mkdir()
    (root / "dog" / "locked" / "x.jpg").write_bytes(jpeg_bytes(photo()))
    _locked(monkeypatch, "locked")
    (root / "cat").rename(root / "locked")  # a subject folder that cannot be listed
    (root / "subjects.csv").write_text("subject_id,category\ndog,dog\nlocked,cat\n")
    scan = scan_source(root)
    assert _reject_reasons(scan) == {
        "dog/locked": "cannot read the folder: Permission denied", "locked": "cannot read the folder: Permission denied"
    }
    assert [p.source_uri for p in scan.photos] == ["dog/00.jpg"]


def test_file_size_is_checked_before_hashing(tmp_path, monkeypatch):
    root = make_source(tmp_path / "src", {"dog": "dog"}, sample=False)
    (root / "dog" / "00.jpg").write_bytes(jpeg_bytes(photo(size=(32, 32))))
    with open(root / "dog" / "huge.jpg", "wb") as fh:
        fh.truncate(5000)
    hashed = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    scan = scan_source(root, max_bytes=4096)
    assert _reject_reasons(scan) == {"dog/huge.jpg": "file too large: 5000 bytes > limit 4096 (data.decode.max_bytes)"}
    assert hashed == ["00.jpg"]


def test_a_file_name_that_is_not_utf8_is_a_reject_with_a_printable_uri(tmp_path):
    # Parquet strings are UTF-8: such a name as a row or reject crashed the build's write.
    root = make_source(tmp_path / "src", {"dog": "dog"}, sample=False)
    (root / "dog" / "00.jpg").write_bytes(jpeg_bytes(photo(size=(32, 32))))
    with open(os.path.join(os.fsencode(root / "dog"), b"caf\xe9.jpg"), "wb") as fh:
        fh.write(jpeg_bytes(photo(size=(32, 32))))
    folder = os.path.join(os.fsencode(root), b"chien\xe9")
    os.mkdir(folder)
    with open(os.path.join(folder, b"p.jpg"), "wb") as fh:
        fh.write(jpeg_bytes(photo(size=(32, 32))))
    scan = scan_source(root)
    not_utf8 = "file name is not UTF-8: rename it"
    assert _reject_reasons(scan) == {"dog/caf\\xe9.jpg": not_utf8, "chien\\xe9/p.jpg": not_utf8}
    assert [p.source_uri for p in scan.photos] == ["dog/00.jpg"]
    for rejected, _ in scan.rejects:  # what a Parquet writer needs
        assert rejected.source_uri.encode("utf-8") and rejected.subject_id.encode("utf-8")


def test_a_folder_named_three_dots_is_a_subject_not_hidden(tmp_path):
    root = make_source(tmp_path / "src", {"...": "dog"}, sample=False)
    (root / "..." / "a.jpg").write_bytes(jpeg_bytes(photo()))
    (root / "..." / ".hidden.jpg").write_bytes(jpeg_bytes(photo(1)))
    scan = scan_source(root)
    assert [(p.subject_id, p.source_uri) for p in scan.photos] == [("...", ".../a.jpg")]
    assert "1 hidden file" in "\n".join(scan.warnings)
