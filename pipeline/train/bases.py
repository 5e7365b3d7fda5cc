"""Base models for fine-tuning, loaded once per worker process when the worker keeps them.

`load_base(path, device)` returns the BlipDiffusion at `path` on `device`. By default it loads
from disk every time. A worker that fine-tunes subject after subject (finetune-many's actors,
pipeline/train/many.py) calls `keep_bases()` first: the first load is kept, and every later call
for the same path hands the same model back restored to exactly what was loaded, which costs a
copy of the weights instead of a load from disk (8.8 s for a real-sized base on an H100 node).

Restoring is generic, so no method has to undo what it did: each submodule's attributes are
put back as they were at load (which drops LoRA wrappers peft injected and anything else
attached), then every parameter and buffer gets its loaded value, `requires_grad` and no `.grad`.
The loaded values are kept on the CPU (pinned when the model lives on a GPU, so the copy back
runs at PCIe speed).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.model import BlipDiffusion

log = logging.getLogger(__name__)

_kept: dict[str, _KeptBase] | None = None  # None: this process does not keep bases
loads = 0  # bases read from disk by this process (finetune-many reports it per subject)


@dataclass
class _KeptBase:
    model: BlipDiffusion
    values: dict[str, torch.Tensor]  # parameter and buffer values at load, on the CPU
    requires_grad: dict[str, bool]
    attributes: dict[nn.Module, dict]  # each submodule's __dict__ at load (containers copied)
    handed_out: bool = False


def keep_bases() -> None:
    """From now on this process keeps the last base it loaded (see the module docstring)."""
    global _kept
    if _kept is None:
        _kept = {}


def load_base(path: str | Path, device: torch.device | str = "cpu") -> BlipDiffusion:
    """The base at `path` on `device`, as loaded from disk. The global RNG is left as it was, so
    a kept base and a fresh load leave the same random state to what is built on them next."""
    device = torch.device(device)
    key = str(path)
    if _kept is not None and key in _kept:
        kept = _kept[key]
        if kept.handed_out:
            _restore(kept)
        kept.handed_out = True
        return kept.model.to(device)
    model = _load(key)
    if _kept is None:
        return model.to(device)
    # Values from the CPU copy before the move (pinned copies when the model goes to a GPU);
    # module attributes after it, as they hold the moved buffers.
    values = {name: t.detach().pin_memory() if device.type == "cuda" else t.detach().clone() for name, t in _tensors(model)}
    model = model.to(device)
    _kept.clear()  # one base per worker: finetune-many trains every subject on the same one
    _kept[key] = _KeptBase(
        model, values, {name: p.requires_grad for name, p in model.named_parameters()},
        {module: _copy_attributes(module.__dict__) for module in model.modules()}, handed_out=True,
    )
    return model


def _load(path: str) -> BlipDiffusion:
    global loads
    start = time.perf_counter()
    # Building the modules draws their (then overwritten) initial weights from the global RNG.
    with torch.random.fork_rng(devices=[]):
        model = BlipDiffusion.from_pretrained(path)
    loads += 1
    log.info("loaded the base %s in %.1f s", path, time.perf_counter() - start)
    return model


@torch.no_grad()
def _restore(kept: _KeptBase) -> None:
    for module, attributes in kept.attributes.items():
        module.__dict__.clear()
        module.__dict__.update(_copy_attributes(attributes))
    for name, tensor in _tensors(kept.model):
        tensor.copy_(kept.values[name], non_blocking=True)
    for name, param in kept.model.named_parameters():
        param.requires_grad_(kept.requires_grad[name])
        param.grad = None


def _tensors(model: nn.Module):
    """(name, tensor) of every parameter and buffer; a tied tensor once."""
    yield from model.named_parameters()
    yield from model.named_buffers()


def _copy_attributes(attributes: dict) -> dict:
    """A copy of a module's __dict__ one level deep: `_modules`, `_parameters`, hook tables and
    other containers are mutated in place by whatever wraps or extends the module."""
    return {k: copy.copy(v) if isinstance(v, dict | list | set) else v for k, v in attributes.items()}
