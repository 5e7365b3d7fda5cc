"""An exponential moving average of the trained weights (`train.ema_decay`).

After every optimizer step each shadow tensor moves towards its parameter:
shadow <- decay * shadow + (1 - decay) * param. The average of the last ~1 / (1 - decay) steps
is smoother than the last weights, which is why long pretraining runs sample and ship it. The
loop saves the averaged weights beside the trained ones (EMA_FOLDER of a checkpoint) and the
sample hook and registration use them (`model_folder`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

EMA_FOLDER = "ema"  # a checkpoint's averaged weights: <checkpoint>/ema/<MODEL_FOLDER>, same layout


class EMA:
    """Shadow copies of `params` (same shapes, dtypes and device) and their update."""

    def __init__(self, params: Sequence[nn.Parameter], decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average: lerp(shadow, param, 1 - decay) = decay * shadow + (1 - decay) * param."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the parameters for the block (sampling, saving); the trained
        ones are back after it. Values are swapped in place, one tensor at a time: the
        parameters keep their storage (CUDA graphs and compiled code hold its address), and
        the swap needs no second copy of the model."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for param, shadow in zip(self.params, self.shadow, strict=True):
            kept = param.detach().clone()
            param.copy_(shadow)
            shadow.copy_(kept)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.detach() for s in self.shadow]}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The shadow of a checkpoint's train state (a resumed run goes on averaging)."""
        shadow = state["shadow"]
        if len(shadow) != len(self.shadow) or any(a.shape != b.shape for a, b in zip(shadow, self.shadow, strict=True)):
            raise ValueError("the checkpoint's EMA does not match the trained parameters")
        for own, saved in zip(self.shadow, shadow, strict=True):
            own.copy_(saved)


def model_folder(checkpoint: Path, name: str) -> Path:
    """What a checkpoint ships (registration, a fine-tune's artifact): its averaged weights
    `checkpoint/EMA_FOLDER/name` when the run kept an EMA, else `checkpoint/name`."""
    averaged = Path(checkpoint) / EMA_FOLDER / name
    return averaged if averaged.is_dir() else Path(checkpoint) / name
