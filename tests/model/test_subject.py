"""Subject folders: subject.json names a method the traits table (config.py FINETUNE_TRAITS) knows."""

import json

import pytest

from pipeline.model.checkpoint import CheckpointError
from pipeline.model.subject import SUBJECT_FILE, SubjectSpec


def test_a_subject_of_an_unknown_method_is_refused_naming_the_file(tmp_path):
    spec = {"method": "hypernetwork", "subject_id": "dog", "category": "dog", "base": "base", "resolution": 64}
    (tmp_path / SUBJECT_FILE).write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match=rf"{SUBJECT_FILE}: unknown method 'hypernetwork'; one of blipd, lora"):
        SubjectSpec.read(tmp_path)
