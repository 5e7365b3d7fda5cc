"""The training step's speed settings (pipeline/train/speed.py) and the fixed-shape conditioning
they rely on; the CUDA-graph path itself needs a GPU (benchmarks/bench_finetune.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ASSETS_DIR
from pipeline.model import BlipDiffusion
from pipeline.train.speed import attention_kernels, use_cuda_graphs

TINY = ASSETS_DIR / "tiny-blipdiffusion"


def test_cuda_graphs_only_where_they_are_safe():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert use_cuda_graphs(True, cuda, world_size=1, grad_accum=1, compiled=False)
    assert not use_cuda_graphs(True, cpu, world_size=1, grad_accum=1, compiled=False)
    assert not use_cuda_graphs(True, cuda, world_size=2, grad_accum=1, compiled=False)
    assert not use_cuda_graphs(True, cuda, world_size=1, grad_accum=4, compiled=False)
    assert not use_cuda_graphs(True, cuda, world_size=1, grad_accum=1, compiled=True)
    assert not use_cuda_graphs(False, cuda, world_size=1, grad_accum=1, compiled=False)


def test_unknown_attention_backend_is_an_error():
    with attention_kernels("no-cudnn"), attention_kernels("default"):
        pass
    with pytest.raises(ValueError, match="bogus"):
        attention_kernels("bogus")


def test_dropped_rows_give_the_qformer_no_gradient():
    """Every row goes through the Q-Former now; a dropped row must still not train it."""
    model = BlipDiffusion.from_pretrained(TINY).train()
    size = model.qformer.image_size
    pixels = torch.randn(2, 3, size, size)
    hidden = model.encode_conditioning(pixels, ["dog", "teddy bear"], ["a dog", "a teddy bear"], torch.tensor([True, False]))
    hidden[0].sum().backward(retain_graph=True)
    assert model.qformer.query_tokens.grad is not None and model.qformer.query_tokens.grad.abs().sum() == 0
    hidden[1].sum().backward()
    assert model.qformer.query_tokens.grad.abs().sum() > 0


@torch.no_grad()
def test_padded_category_text_leaves_subject_embeddings_unchanged():
    """Category ids are padded to a multiple of 16 (fixed shapes); padding is masked out."""
    model = BlipDiffusion.from_pretrained(TINY)
    size = model.qformer.image_size
    pixels = torch.randn(1, 3, size, size)
    text = model.qformer_tokenizer(["teddy bear"], return_tensors="pt")
    assert text.input_ids.shape[1] < 16
    unpadded = model.qformer(pixels, text.input_ids, text.attention_mask)
    torch.testing.assert_close(model.subject_embeddings(pixels, ["teddy bear"]), unpadded, rtol=1e-5, atol=1e-5)
