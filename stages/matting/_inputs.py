"""What the public matting functions take and give back: numpy arrays or torch tensors."""

from __future__ import annotations

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


def as_tensor(a: ArrayLike, device: torch.device | str | None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if not t.is_floating_point():
        raise TypeError(f"expected float32 or float64 arrays, got {t.dtype}")
    return t.to(device) if device is not None else t


def working_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pad_to(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(H, W, ...) -> (h, w, ...), zero padded at the bottom and right."""
    pad = torch.zeros((h, w, *t.shape[2:]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0], : t.shape[1]] = t
    return pad


def to_output(t: torch.Tensor, like: ArrayLike) -> ArrayLike:
    if isinstance(like, np.ndarray):
        return t.cpu().numpy()
    return t.to(like.device)
