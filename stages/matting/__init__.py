"""Batched closed-form matting (Levin et al. 2008) and multilevel foreground estimation in torch.

The GPU counterparts of pymatting's `estimate_alpha_cf` and `estimate_foreground_ml`, for the
matte stage: pure tensor functions, with no Ray and no I/O, on CPU or CUDA. One algorithm a
module, as in pymatting:

- laplacian.py: the matting Laplacian's stencil, and the unknown pixels' rows of it (the system);
- cg.py: batched Jacobi-preconditioned conjugate gradients on that system;
- alpha.py: `estimate_alpha_cf_torch`, the two composed over a coarse-to-fine pyramid;
- foreground.py: `estimate_foreground_torch`, the multilevel red-black sweeps;
- _kernels.py: which kernels a call runs (Triton, torch.compile or eager) and the fallback;
- laplacian_triton.py, cg_triton.py, foreground_triton.py: the Triton kernels, for CUDA.
"""

from stages.matting.alpha import BG_THRESHOLD, DEFAULT_TOL, FG_THRESHOLD, estimate_alpha_cf_torch
from stages.matting.foreground import estimate_foreground_torch

__all__ = ["BG_THRESHOLD", "DEFAULT_TOL", "FG_THRESHOLD", "estimate_alpha_cf_torch", "estimate_foreground_torch"]
