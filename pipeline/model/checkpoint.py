"""Reading and writing the released BLIP-Diffusion folder layout.

The layout (``Salesforce/blipdiffusion``)::

    model_index.json            class names per component, ctx_begin_pos, mean, std
    qformer/                    config.json (a Blip2Config) + model.safetensors
    text_encoder/               config.json (a CLIPTextConfig) + model.safetensors
    unet/ vae/                  diffusers configs + diffusion_pytorch_model.safetensors
    scheduler/                  scheduler_config.json
    tokenizer/                  CLIP BPE files
    image_processor/            preprocessor_config.json
    qformer_tokenizer/          ours, optional: the Q-Former's BERT tokenizer files

Weights are read from safetensors (single or sharded) or from PyTorch `.bin` files, and written
as single safetensors files with the exact tensor names of the reference.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
# Folders the reference pipeline needs; `qformer_tokenizer/` is ours and optional.
REQUIRED_FOLDERS = ("qformer", "text_encoder", "unet", "vae", "scheduler", "tokenizer", "image_processor")
QFORMER_TOKENIZER_FOLDER = "qformer_tokenizer"

# File stems transformers and diffusers use for weights.
TRANSFORMERS_WEIGHTS = ("model", "pytorch_model")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model",)


class CheckpointError(UserError, ValueError):
    """A checkpoint folder that cannot be loaded; the message names the missing or wrong part."""


def resolve_checkpoint(path_or_id: str | Path, local_files_only: bool = False) -> Path:
    """A local folder holding the layout: `path_or_id` itself, or a Hub snapshot of that repo id.

    Raises CheckpointError when the folder or a required part of it is missing.
    """
    path = Path(path_or_id).expanduser()
    if path.exists() or str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        if not path.is_dir():
            raise CheckpointError(f"checkpoint folder not found: {path}")
        check_layout(path)
        return path
    folder = _download(str(path_or_id), local_files_only)
    check_layout(folder)
    return folder


def check_layout(folder: Path) -> None:
    if not (folder / MODEL_INDEX).is_file():
        raise CheckpointError(f"{folder} is not a BLIP-Diffusion checkpoint: {MODEL_INDEX} is missing")
    missing = [name for name in REQUIRED_FOLDERS if not (folder / name).is_dir()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks the folder(s) {', '.join(missing)}")


def _download(repo_id: str, local_files_only: bool) -> Path:
    """Snapshot a Hub repo, taking safetensors over `.bin` where a component has both."""
    from huggingface_hub import HfApi, snapshot_download

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # one clear error below beats five retry warnings
    try:
        ignore: list[str] = ["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*fp16*"]
        if not local_files_only:
            for name in HfApi().list_repo_files(repo_id):
                if name.endswith(".safetensors"):
                    ignore.append(str(Path(name).parent / "*.bin"))
        return Path(snapshot_download(repo_id, ignore_patterns=ignore, local_files_only=local_files_only))
    except Exception as exc:  # the hub client raises many types for "not reachable / not found"
        first_line = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot get {repo_id!r}: it is not a local folder and the Hub download failed "
            f"({first_line}). Offline, download it elsewhere and pass the folder."
        ) from exc
    finally:
        hub_log.setLevel(level)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing config file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # not JSON, or not text at all
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError:  # nested past Python's recursion: no config is
        raise CheckpointError(f"{path} is not a config: its JSON nests too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_weights(folder: Path, stems: Iterable[str] = TRANSFORMERS_WEIGHTS) -> dict[str, torch.Tensor]:
    """All tensors of a component folder, from `<stem>.safetensors`, its sharded index, or `.bin`."""
    for stem in stems:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return _load_safetensors(single)
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_safetensors(folder / shard))
            return state
        legacy = folder / f"{stem}.bin"
        if legacy.is_file():
            return torch.load(legacy, map_location="cpu", weights_only=True)
    raise CheckpointError(f"no weights in {folder} (looked for {', '.join(stems)} .safetensors/.bin)")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of `path`; CheckpointError naming it when it is not a whole safetensors file
    (random bytes, a download cut short): safetensors' own SafetensorError names no file."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated?): {exc}") from exc


def write_weights(folder: Path, state: dict[str, torch.Tensor], filename: str = "model.safetensors") -> None:
    """Write one safetensors file; metadata format=pt so transformers' loaders accept it."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    save_file(tensors, str(folder / filename), metadata={"format": "pt"})


def load_exact(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    component: str,
    optional: Iterable[str] = (),
) -> None:
    """Load `state` into `module`, failing with every missing and unexpected name listed.

    Names in `optional` (buffers the reference serialises but we rebuild, like position ids) may
    be present or absent. Tensors keep the module's dtype.
    """
    optional = set(optional)
    own = module.state_dict()
    expected = set(own)
    given = set(state)
    missing = sorted(expected - given - optional)
    unexpected = sorted(given - expected - optional)
    if missing or unexpected:
        raise CheckpointError(
            f"{component} weights do not match the model: "
            f"missing {_preview(missing)}; unexpected {_preview(unexpected)}"
        )
    for name in sorted(expected & given):
        want = own[name].shape
        if state[name].shape != want:
            raise CheckpointError(
                f"{component} weight {name} has shape {tuple(state[name].shape)}, the config gives {tuple(want)}"
            )
    result = module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    assert set(result.missing_keys) <= optional and not result.unexpected_keys, result


def _preview(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
