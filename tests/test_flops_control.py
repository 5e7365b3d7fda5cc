"""benchmarks/flops_control.py counts what the GPU runs: attention included on any device."""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from flops_control import count  # noqa: E402


def test_count_includes_attention_on_cpu():
    # The CPU's fused attention kernel has no FLOP formula: counted as is, attention was 0
    # (252 GFLOPs of a real-size UNet call). Two (b, h, s, s, d) matmuls: 4 * b * h * s^2 * d.
    q = torch.randn(1, 2, 16, 8)
    total, _ = count(lambda: F.scaled_dot_product_attention(q, q, q))
    assert total == 4 * 1 * 2 * 16 * 16 * 8


def test_count_is_the_same_on_meta_and_cpu():
    layer = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 16, 8)
    cpu, _ = count(lambda: layer(x, x, x, need_weights=False))
    layer.to("meta")
    meta, _ = count(lambda: layer(*(x.to("meta"),) * 3, need_weights=False))
    assert cpu == meta > 0
