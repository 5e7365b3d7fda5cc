"""Write the `tiny` profile's DINO and CLIP checkpoints (pipeline/assets/tiny-dino, tiny-clip).

    python -m pipeline.evaluation.make_tiny [--out DIR]

Both are in the official Hugging Face layout of `facebook/dino-vits16` (a ViTModel) and
`openai/clip-vit-base-patch32` (a CLIPModel with its CLIP BPE tokenizer and image processor),
with small configs and random weights, so tests load them through the same code that loads the
real ids. Scores computed with them are meaningless. Seeded: re-running rewrites the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import ASSETS_DIR
from pipeline.model.image_processing import CLIP_MEAN, CLIP_STD
from pipeline.tiny_models import tiny_clip_text_config, write_tiny_clip_tokenizer

SEED = 0
IMAGE_SIZE = 32  # 224 in the real models; patches of 8 px give 16 patches
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_tiny_dino(out: Path, seed: int = SEED) -> Path:
    """A ViT-S/16-shaped DINO ViTModel, shrunk: `config.json`, `model.safetensors`,
    `preprocessor_config.json`."""
    import torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=IMAGE_SIZE,
        patch_size=8,
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )
    torch.manual_seed(seed)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(out)
    ViTImageProcessor(
        do_resize=True, size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, resample=3, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)
    ).save_pretrained(out)
    return out


def make_tiny_clip(out: Path, seed: int = SEED) -> Path:
    """A CLIP ViT-B/32-shaped CLIPModel, shrunk, with a byte-level CLIP tokenizer (any text
    tokenizes) and a CLIP image processor: the files of `openai/clip-vit-base-patch32`."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    vocab_size = write_tiny_clip_tokenizer(out)
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    config = CLIPConfig(
        text_config=tiny_clip_text_config(vocab_size),
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(out)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    # Saved separately, as the released repo has them (preprocessor_config.json, tokenizer files).
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="folder that receives tiny-dino/ and tiny-clip/")
    args = parser.parse_args(argv)
    print(make_tiny_dino(args.out / "tiny-dino"))
    print(make_tiny_clip(args.out / "tiny-clip"))


if __name__ == "__main__":
    main()
