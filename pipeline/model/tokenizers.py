"""The two tokenizers: CLIP BPE for the prompt, BERT WordPiece for the Q-Former's category text."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import BertTokenizer, CLIPTokenizer

from pipeline.model.checkpoint import QFORMER_TOKENIZER_FOLDER, CheckpointError

log = logging.getLogger(__name__)

# The reference adds this as the BERT tokenizer's bos token (BLIP-2's decoder prompt). It never
# appears in category text, so ids of real text are unaffected; we add it to stay identical.
_DEC_TOKEN = "[DEC]"


def load_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    try:
        return CLIPTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"cannot load the CLIP tokenizer from {folder}: {exc}") from exc


def load_qformer_tokenizer(root: Path, config_field: str | None, override: str | Path | None = None) -> BertTokenizer:
    """The Q-Former's BERT tokenizer, from the first place that has one:

    1. `override` (a local folder with vocab.txt, or a Hub id), when given;
    2. `<root>/qformer_tokenizer/` (written by our `save_pretrained`);
    3. the `tokenizer` field of `qformer/config.json` as a folder (absolute, or relative to the
       checkpoint), else as a Hub id from the local cache or the Hub (`bert-base-uncased` for the
       released model; the reference loads exactly this).

    Raises CheckpointError saying what was tried when none loads (e.g. offline with no cache).
    """
    candidates: list[str] = []
    if override is not None:
        candidates.append(str(override))
    else:
        if (root / QFORMER_TOKENIZER_FOLDER).is_dir():
            candidates.append(str(root / QFORMER_TOKENIZER_FOLDER))
        field = config_field or "bert-base-uncased"
        relative = root / field
        candidates.append(str(relative) if relative.is_dir() else field)
    errors = []
    for candidate in candidates:
        try:
            tokenizer = BertTokenizer.from_pretrained(candidate, truncation_side="right")
        except (OSError, ValueError, TypeError) as exc:
            errors.append(f"{candidate}: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        tokenizer.add_special_tokens({"bos_token": _DEC_TOKEN})
        return tokenizer
    raise CheckpointError(
        "cannot load the Q-Former's BERT tokenizer; tried " + "; ".join(errors) + ". Offline, pass "
        "qformer_tokenizer=<folder with vocab.txt> (CLI: --qformer-tokenizer), or put the files in "
        f"<checkpoint>/{QFORMER_TOKENIZER_FOLDER}/."
    )
