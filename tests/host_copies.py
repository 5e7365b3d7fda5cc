"""Which copies from host memory to a device would make the host wait.

On a GPU a plain `.to(device)` of pageable memory waits for every kernel already queued on the
stream. In a pipelined serving replica (pipeline/serving/drawn.py) that is the previous batch's
whole denoising, so the replica could no longer draw ahead of it. Tests run the code on PyTorch's
meta device, where this mode sees each copy and its `non_blocking` flag.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostCopies(TorchDispatchMode):
    """Records each copy of a CPU tensor to another device: `seen`, all of them; `waiting`,
    those the host would wait for (non_blocking False)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self.waiting: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:  # tensor.to(device)
            self._record(args[0], kwargs.get("device"), kwargs.get("non_blocking", False))
        elif func is torch.ops.aten.copy_.default:  # device_tensor.copy_(host_tensor)
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            self._record(args[1], args[0].device, non_blocking)
        return func(*args, **kwargs)

    def _record(self, source: torch.Tensor, device: torch.device | str | None, non_blocking: bool) -> None:
        if source.device.type == "cpu" and device is not None and torch.device(device).type != "cpu":
            copy = f"{tuple(source.shape)} {source.dtype} -> {device}"
            self.seen.append(copy)
            if not non_blocking:
                self.waiting.append(copy)
