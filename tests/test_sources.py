import hashlib

import pytest

from pipeline.sources import SourceError, read_subjects_csv, scan_source, sha256_file
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
    ],
)
def test_bad_subjects_csv_is_a_clear_error(tmp_path, text, match):
    (tmp_path / "subjects.csv").write_text(text)
    with pytest.raises(SourceError, match=match):
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
