"""Write the tiny BLIP-Diffusion checkpoint: the released layout, small configs, random weights.

    python -m pipeline.model.make_tiny [--out DIR] [--controlnet-out DIR]

The default outputs are the ones the `tiny` profile loads (pipeline/assets/tiny-blipdiffusion,
and beside it tiny-controlnet, a ControlNet made from that checkpoint's UNet).
It keeps the real model's structure where behaviour depends on it (16 query tokens, 77 text
positions, a 224 px ViT input, a VAE that downsamples 8x) and shrinks every width and depth.
The tokenizer files are written here too: a byte-level CLIP BPE vocabulary (every byte, so any
text tokenizes, plus merges for a few words) and a small lowercase BERT WordPiece vocabulary.
Seeded, so re-running rewrites identical files.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, UNet2DConditionModel
from torch import nn
from transformers import Blip2QFormerConfig, Blip2VisionConfig, CLIPTextConfig

from pipeline.model.blip_diffusion import BlipDiffusion, _default_model_index
from pipeline.model.checkpoint import QFORMER_TOKENIZER_FOLDER, write_json, write_weights
from pipeline.model.image_processing import CLIP_MEAN, CLIP_STD, SubjectImageProcessor
from pipeline.model.qformer import SubjectQFormer
from pipeline.model.text_encoder import ContextCLIPTextModel

log = logging.getLogger(__name__)

SEED = 0
WIDTH = 32  # Q-Former and text-encoder width (768 in the released model)
NUM_QUERY_TOKENS = 16
TEXT_POSITIONS = 77
# Words given whole-word BPE merges / WordPiece entries, so common prompts tokenize like words.
WORDS = (
    "a an the of on in at with and photo picture dog cat bear teddy toy bag backpack "
    "beach snow forest city street table grass water red blue green sunglasses wearing "
    "swimming underwater painting style"
).split()


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable-unicode table (GPT-2's), in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_clip_tokenizer(folder: Path) -> int:
    """vocab.json + merges.txt + configs of a byte-level CLIP BPE; returns the vocabulary size."""
    base = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(base)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(base)})
    merges: list[str] = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:  # merge left to right: "d o", "do g</w>"
            merge = f"{symbols[0]} {symbols[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    write_json(folder / "special_tokens_map.json", specials)
    write_json(
        folder / "tokenizer_config.json",
        {**specials, "tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_POSITIONS, "do_lower_case": True},
    )
    return len(vocab)


def write_bert_tokenizer(folder: Path) -> int:
    """vocab.txt + config of a lowercase WordPiece vocabulary; returns its size."""
    chars = "abcdefghijklmnopqrstuvwxyz0123456789"
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *".,!?'-", *(f"##{c}" for c in chars), *WORDS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    write_json(
        folder / "tokenizer_config.json",
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64},
    )
    return len(dict.fromkeys(tokens))


def tiny_qformer_config(bert_vocab_size: int) -> dict:
    vision = Blip2VisionConfig(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=16,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        qkv_bias=True,
    )
    qformer = Blip2QFormerConfig(
        vocab_size=bert_vocab_size + 1,  # + the [DEC] token, as the released 30522 + 1
        hidden_size=WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=64,
        cross_attention_frequency=1,
        encoder_hidden_size=WIDTH,
    )
    return {
        "architectures": ["Blip2QFormerModel"],
        "model_type": "blip-2",
        "num_query_tokens": NUM_QUERY_TOKENS,
        "tokenizer": QFORMER_TOKENIZER_FOLDER,
        "vision_config": vision.to_dict(),
        "qformer_config": qformer.to_dict(),
    }


def tiny_text_config(clip_vocab_size: int) -> dict:
    config = CLIPTextConfig(
        vocab_size=clip_vocab_size,
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_POSITIONS,
        hidden_act="quick_gelu",
        bos_token_id=clip_vocab_size - 2,
        eos_token_id=clip_vocab_size - 1,
        pad_token_id=clip_vocab_size - 1,
    )
    return {**config.to_dict(), "architectures": ["ContextCLIPTextModel"]}


def tiny_unet() -> UNet2DConditionModel:
    # Four blocks, so the UNet's latent factor (which the reference uses to size latents) equals
    # the VAE's 8, as in SD 1.5. Cross-attention only below full latent resolution:
    # self-attention over 64x64 latents (4096 tokens) would make CPU runs slow.
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=2,  # diffusers reads this as the number of heads
        norm_num_groups=8,
    )


def tiny_vae() -> AutoencoderKL:
    # Four blocks so latents are 1/8 of the image, as in SD 1.5.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,
        sample_size=512,
    )


def sd_scheduler() -> PNDMScheduler:
    """SD 1.5's scheduler config, which the released checkpoint ships."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )


def _randomize(module: nn.Module) -> None:
    """Small random values everywhere (zeros-initialised query tokens and positions included)."""
    for name, param in module.named_parameters():
        if name.endswith("LayerNorm.weight") or "layernorm.weight" in name or "layer_norm" in name:
            nn.init.normal_(param, mean=1.0, std=0.02)
        else:
            nn.init.normal_(param, std=0.02)


def make_tiny(out: Path) -> Path:
    torch.manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "tiny"
        clip_size = write_clip_tokenizer(staging / "tokenizer")
        bert_size = write_bert_tokenizer(staging / QFORMER_TOKENIZER_FOLDER)
        qformer, text_encoder = SubjectQFormer(tiny_qformer_config(bert_size)), ContextCLIPTextModel(tiny_text_config(clip_size))
        _randomize(qformer)
        _randomize(text_encoder)
        write_json(staging / "model_index.json", {**_default_model_index(), "mean": list(CLIP_MEAN), "std": list(CLIP_STD)})
        for name, module in (("qformer", qformer), ("text_encoder", text_encoder)):
            write_json(staging / name / "config.json", module.raw_config)
            write_weights(staging / name, module.state_dict())
        tiny_unet().save_pretrained(staging / "unet", safe_serialization=True)
        tiny_vae().save_pretrained(staging / "vae", safe_serialization=True)
        sd_scheduler().save_pretrained(staging / "scheduler")
        SubjectImageProcessor().save_pretrained(staging / "image_processor")
        # Round-trip through our own loader and writer, so the shipped files are what
        # save_pretrained produces.
        model = BlipDiffusion.from_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log.info("wrote %s (%.2f MB)", out, size / 2**20)
    return out


def make_tiny_controlnet(checkpoint: Path, out: Path) -> Path:
    """A ControlNet for the UNet in `checkpoint`, written to `out` (diffusers layout).

    It starts as a copy of the UNet's encoder, as ControlNet training does; the layers that
    training starts at zero (the conditioning embedding's last conv and the zero convolutions
    into the UNet) get small random values, so the control map changes the output. The
    conditioning embedding downsamples 8x (three strided convs), matching the latents.
    """
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel.from_pretrained(str(checkpoint / "unet"))
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    zero_initialised = ("controlnet_cond_embedding.conv_out", "controlnet_down_blocks", "controlnet_mid_block")
    for name, param in controlnet.named_parameters():
        if name.startswith(zero_initialised):
            nn.init.normal_(param, std=0.1)
    if out.exists():
        shutil.rmtree(out)
    controlnet.save_pretrained(out, safe_serialization=True)
    config = json.loads((out / "config.json").read_text())
    if config.pop("_name_or_path", None) is not None:  # a machine-specific path
        write_json(out / "config.json", config)
    log.info("wrote %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ASSETS_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR / "tiny-blipdiffusion")
    parser.add_argument("--controlnet-out", type=Path, default=ASSETS_DIR / "tiny-controlnet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    make_tiny(args.out)
    make_tiny_controlnet(args.out, args.controlnet_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
