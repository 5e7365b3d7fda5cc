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


def _is_file_problem(exc: Exception) -> bool:
    """Whether `exc`, raised by a tokenizer's from_pretrained, is about its files: a missing or
    bad file (OSError, ValueError, TypeError), or the bare Exception the tokenizers library
    (Rust) raises for a vocabulary it cannot read ("Error while initializing WordPiece: stream
    did not contain valid UTF-8"). Any other exception stays a bug, with its stack trace."""
    return isinstance(exc, OSError | ValueError | TypeError) or type(exc) is Exception


def load_clip_tokenizer(folder: Path, embedding_rows: int) -> CLIPTokenizer:
    """The prompt tokenizer in `folder`, checked against the text encoder's `embedding_rows`."""
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        if not _is_file_problem(exc):
            raise
        raise CheckpointError(f"cannot load the CLIP tokenizer from {folder}: {exc}") from exc
    problem = vocabulary_problem(tokenizer, embedding_rows)
    if problem:
        raise CheckpointError(f"CLIP tokenizer in {folder}: {problem}")
    return tokenizer


def vocabulary_problem(tokenizer, embedding_rows: int) -> str | None:
    """Why `tokenizer` cannot feed an embedding table of `embedding_rows`, or None.

    transformers 5 builds a tokenizer with only its special tokens when the vocabulary files are
    missing, without an error; every word would then map to the unknown token.
    """
    size = len(tokenizer)
    if size <= len(tokenizer.all_special_ids) + 1:
        return f"it has no vocabulary ({size} tokens, only special ones): its vocabulary files are missing"
    if size > embedding_rows:
        return f"it has {size} tokens but the model embeds only {embedding_rows}"
    return None


def load_qformer_tokenizer(
    root: Path,
    config_field: str | None,
    embedding_rows: int,
    override: str | Path | None = None,
    local_files_only: bool = False,
) -> BertTokenizer:
    """The Q-Former's BERT tokenizer, from the first place that has one:

    1. `override` (a local folder with vocab.txt, or a Hub id), when given;
    2. `<root>/qformer_tokenizer/` (written by our `save_pretrained`);
    3. the `tokenizer` field of `qformer/config.json` as a folder (absolute, or relative to the
       checkpoint root), else as a Hub id: first from the local Hugging Face cache, then, unless
       `local_files_only`, from the Hub (`bert-base-uncased` for the released model, which is
       what the reference loads).

    A tokenizer must fit the Q-Former's `embedding_rows` word embeddings. Raises
    CheckpointError saying what was tried when none loads (e.g. offline with no cache).
    """
    candidates: list[tuple[str, bool]] = []  # (name or folder, local only)
    if override is not None:
        candidates.append((str(override), False))
    else:
        if (root / QFORMER_TOKENIZER_FOLDER).is_dir():
            candidates.append((str(root / QFORMER_TOKENIZER_FOLDER), True))
        field = config_field or "bert-base-uncased"
        folder = root / field  # an absolute field stays absolute
        if folder.is_dir():
            candidates.append((str(folder), True))
        else:
            candidates.append((field, True))
            if not local_files_only:
                candidates.append((field, False))
    errors = []
    for candidate, local_only in candidates:
        try:
            tokenizer = BertTokenizer.from_pretrained(
                candidate, truncation_side="right", local_files_only=local_only or local_files_only
            )
        except Exception as exc:
            if not _is_file_problem(exc):
                raise
            where = "local cache" if local_only and not Path(candidate).is_dir() else "files"
            first_line = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
            errors.append(f"{candidate} ({where}): {first_line}")
            continue
        tokenizer.add_special_tokens({"bos_token": _DEC_TOKEN})
        problem = vocabulary_problem(tokenizer, embedding_rows)
        if problem is None:
            return tokenizer
        errors.append(f"{candidate}: {problem}")
    raise CheckpointError(
        "cannot load the Q-Former's BERT tokenizer; tried " + "; ".join(errors) + ". Offline, pass "
        "qformer_tokenizer=<folder with vocab.txt> (CLI: --qformer-tokenizer), or put the files in "
        f"<checkpoint>/{QFORMER_TOKENIZER_FOLDER}/."
    )
