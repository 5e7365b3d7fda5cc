"""pipeline/tiny_models.py's command line (`python -m pipeline.tiny_models [NAME] [OUT]`)."""

import pytest

from pipeline import tiny_models


@pytest.mark.parametrize("argv", [["--help"], ["clipsge"]])
def test_a_wrong_name_is_a_usage_error_not_a_stack_trace(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        tiny_models.main(argv)
    assert exited.value.code == (0 if argv == ["--help"] else 2)
    shown = capsys.readouterr()
    assert "clipseg" in shown.out + shown.err and "Traceback" not in shown.err
