"""Write the `tiny` profile's CLIPSeg checkpoint (shipped in pipeline/assets/tiny-clipseg).

    python -m pipeline.tiny_models

The checkpoint is in the official Hugging Face layout (config.json, model.safetensors,
tokenizer and processor files) with small configs and random weights, so tests and the offline
demo load it through the same `from_pretrained` code that loads CIDAS/clipseg-rd64-refined.
Its segmentations are meaningless; it exists to run the pipeline, never to judge quality.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.config import ASSETS_DIR


def byte_level_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for raw bytes (GPT-2/CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_clip_tokenizer(out: Path) -> int:
    """A CLIP BPE tokenizer with a byte-level vocabulary and no merges; returns its vocab size."""
    alphabet = byte_level_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def tiny_clip_text_config(vocab_size: int) -> dict[str, int]:
    """A 2-layer, 32-wide CLIP text tower over the byte-level vocabulary above."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 77,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def clipseg_image_processor(side: int):
    """CLIPSeg's image processor (ImageNet statistics, bilinear resize) at `side` px; the
    released rd64 models use 352."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(
        do_resize=True,
        size={"height": side, "width": side},
        resample=2,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )


def make_tiny_clipseg(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
    )

    vocab_size = write_tiny_clip_tokenizer(out)
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    image_processor = clipseg_image_processor(64)
    config = CLIPSegConfig(
        text_config=tiny_clip_text_config(vocab_size),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 16,
        },
        projection_dim=32,
        extract_layers=[0, 1],
        reduce_dim=16,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    model = CLIPSegForImageSegmentation(config).eval()
    model.save_pretrained(out)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS_DIR / "tiny-clipseg"
    print(make_tiny_clipseg(target))
