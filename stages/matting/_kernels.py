"""Which kernels a matting call runs: Triton, torch.compile or eager torch, and the fallback
between them.

On CUDA the alpha solve and the foreground sweep run as Triton kernels (the *_triton.py
modules); elsewhere, or where Triton is missing, as torch code that torch.compile fuses on CUDA.
Both toolchains can fail on a machine (no compiler, an unsupported GPU), and a failed build
costs its full time again, so the first failure of each is remembered for the life of the
process, in the one `KernelChoice` that `kernel_choice()` returns, and every later call goes
straight to the next tier: Triton -> compiled -> eager.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

CG_CHOICES = ("auto", "torch", "triton", "triton-graphs")

# The tiers a call may run in, fastest first.
TRITON, COMPILED, EAGER = "triton", "compiled", "eager"

T = TypeVar("T")


@functools.cache
def compiled(fn: Callable) -> Callable:
    """fn under torch.compile, built once per process.

    dynamic=True: batch size, photo size and unknown count change between calls (and while the
    batch shrinks), and each static shape would compile anew. Some guards still specialise (a
    batch shrunk to one photo, say), and past dynamo's default limit of 8 recompiles a function
    falls back to eager for the rest of the process."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
    return torch.compile(fn, dynamic=True)


@functools.cache
def _triton_importable() -> bool:
    try:
        import stages.matting.cg_triton  # noqa: F401
    except Exception as exc:  # ImportError, or a Triton that cannot find its backend
        logger.info("Triton CG kernels unavailable (%r)", exc)
        return False
    return True


def _is_triton_error(exc: Exception) -> bool:
    """Errors from building or launching Triton kernels (not out-of-memory or bad input)."""
    return type(exc).__module__.split(".")[0] == "triton" or isinstance(exc, ImportError)


def _is_compile_error(exc: Exception) -> bool:
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


class KernelChoice:
    """What this process knows about its toolchains: whether Triton or torch.compile has failed
    here. Errors that are not a toolchain's (out of memory, bad input) are never a reason to
    fall back."""

    def __init__(self) -> None:
        self.triton_failed = False
        self.compile_failed = False

    def triton_usable(self, image: torch.Tensor) -> bool:
        """Whether this process runs the Triton kernels on `image`: float32 on CUDA, with a
        Triton that imports and has not failed here."""
        return image.is_cuda and image.dtype == torch.float32 and not self.triton_failed and _triton_importable()

    def resolve_cg(self, cg: str, image: torch.Tensor) -> str:
        """estimate_alpha_cf_torch's `cg` for `image`: "auto" made a loop's name, others checked."""
        if cg not in CG_CHOICES:
            raise ValueError(f"cg must be one of {CG_CHOICES}, got {cg!r}")
        if cg == "auto":
            return "triton-graphs" if self.triton_usable(image) else "torch"
        if cg != "torch" and image.dtype != torch.float32:
            raise ValueError(f"cg={cg!r} solves in float32 only, got {image.dtype} images")
        if cg == "triton-graphs" and not image.is_cuda:
            raise ValueError("cg='triton-graphs' needs CUDA tensors (CUDA graphs)")
        return cg

    def tiers(self, triton: bool, compile: bool | None, image: torch.Tensor) -> list[str]:
        """The tiers to try in order: Triton when `triton`, then the torch code compiled where
        `compile` says so (None: on CUDA) and it has not failed here, then eager."""
        use_compile = (image.is_cuda if compile is None else compile) and not self.compile_failed
        return [TRITON] * triton + [COMPILED] * use_compile + [EAGER]

    def run(self, tiers: Sequence[str], attempt: Callable[[str], T], what: str) -> T:
        """attempt(tier) in the first tier that does not fail with its own toolchain's error;
        the failed toolchain is not tried again in this process. `what` names the work in the
        WARNING."""
        for tier in tiers[:-1]:
            try:
                return attempt(tier)
            except Exception as exc:
                if tier == TRITON and _is_triton_error(exc):
                    self.triton_failed = True
                    logger.warning("the Triton %s failed (%r); this process now runs it in torch", what, exc)
                elif tier == COMPILED and _is_compile_error(exc):
                    self.compile_failed = True
                    logger.warning("torch.compile of the %s failed (%r); this process now runs it eagerly", what, exc)
                else:
                    raise
        return attempt(tiers[-1])


@functools.cache
def kernel_choice() -> KernelChoice:
    """The process's one KernelChoice."""
    return KernelChoice()
