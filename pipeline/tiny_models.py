"""Write the `tiny` profile's CLIPSeg and captioner checkpoints (shipped in
pipeline/assets/tiny-clipseg and pipeline/assets/tiny-captioner).

    python -m pipeline.tiny_models [clipseg|captioner] [OUT]

Each checkpoint is in the official Hugging Face layout (config.json, model.safetensors,
tokenizer and processor files) with small configs and random weights, so tests and the offline
demo load it through the same `from_pretrained` code that loads CIDAS/clipseg-rd64-refined and
Salesforce/blip2-opt-2.7b. Their segmentations and captions are meaningless; they exist to run
the pipeline, never to judge quality. Seeded, so re-running rewrites identical weights.
"""

from __future__ import annotations

import argparse
import json
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


# Words given byte-level BPE merges in the tiny captioner's vocabulary, so that some of what it
# writes reads as words.
CAPTION_WORDS = "a the of on in with and dog cat toy bag grass table beach street red blue green sitting standing".split()


def write_tiny_gpt2_tokenizer(out: Path) -> None:
    """An OPT-style byte-level BPE (GPT2Tokenizer files) with OPT's special tokens: printable
    ASCII and the space, so that what a random model writes is ASCII (other bytes read as
    <unk>), plus merges for CAPTION_WORDS with their leading space."""
    space = "\u0120"  # "Ġ", byte-level BPE's stand-in for the space (byte 32); printable bytes stand for themselves
    ascii_chars = [chr(b) for b in range(ord("!"), ord("~") + 1)]
    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", space, *ascii_chars])}
    merges: list[str] = []
    for word in CAPTION_WORDS:
        symbols = [space, *word]
        while len(symbols) > 1:  # merge left to right: "Ġ d", "Ġd o", "Ġdo g"
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def make_tiny_captioner(out: Path, seed: int = 0) -> Path:
    """A BLIP-2 OPT captioner (Blip2ForConditionalGeneration and Blip2Processor, as
    Salesforce/blip2-opt-2.7b) 32 wide and 2 deep in each part, 4 query tokens, 64 px input."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        GPT2Tokenizer,
        OPTConfig,
    )

    write_tiny_gpt2_tokenizer(out)
    tokenizer = GPT2Tokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    query_tokens = 4
    # BLIP-2's image processor: a fixed-size bicubic resize and CLIP's statistics (224 px released).
    image_processor = BlipImageProcessor(
        size={"height": 64, "width": 64},
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=query_tokens)
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16
    )
    qformer = Blip2QFormerConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        encoder_hidden_size=32, max_position_embeddings=64,
    )  # fmt: skip
    text = OPTConfig(
        vocab_size=len(processor.tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
        word_embed_proj_dim=32, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    config = Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(), num_query_tokens=query_tokens
    )
    config.image_token_index = processor.tokenizer.convert_tokens_to_ids(str(processor.image_token))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


_MAKERS = {"clipseg": make_tiny_clipseg, "captioner": make_tiny_captioner}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tiny_models", description="write the tiny profile's checkpoints")
    parser.add_argument("name", nargs="?", choices=list(_MAKERS), help="which one (default: all)")
    parser.add_argument("out", nargs="?", type=Path, help="folder to write (default: pipeline/assets/tiny-NAME)")
    args = parser.parse_args(argv)
    for name in [args.name] if args.name else list(_MAKERS):
        print(_MAKERS[name](args.out or ASSETS_DIR / f"tiny-{name}"))


if __name__ == "__main__":
    main()
