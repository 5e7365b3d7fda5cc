"""Build the tiny BLIP-Diffusion checkpoint and record the reference outputs in this folder.

The reference is diffusers' ``BlipDiffusionPipeline`` (diffusers 0.33.1), which is deprecated
and does not import on transformers 5, so this script runs in a throwaway venv outside the
repo, never in the project environment and never in CI (CI only reads what it wrote):

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install torch==2.13.0 diffusers==0.33.1 transformers==4.51.3 \
        safetensors accelerate pillow numpy
    /tmp/golden-venv/bin/python tests/golden/make_golden.py    # from the repo root

It runs offline on the CPU in under a minute and rewrites, in this folder:

- ``tiny-blipdiffusion/``: a random checkpoint in the released ``Salesforce/blipdiffusion``
  layout (safetensors), plus ``qformer_tokenizer/`` (see ``QFORMER_TOKENIZER_DIR``);
- ``reference.png``: the procedural reference image;
- ``golden.safetensors`` / ``golden.json``: reference tensors, the inputs, and for every tensor
  the call that produced it.

README.md beside this file lists every tensor with its meaning and shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
from pathlib import Path

# The reference Q-Former and the tokenizers call from_pretrained; make any hub access fail
# loudly instead of hanging on a network that is not there. Set before the HF imports read it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import PIL  # noqa: E402
import safetensors  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.pipelines.blip_diffusion import BlipDiffusionPipeline  # noqa: E402
from diffusers.pipelines.blip_diffusion.blip_image_processing import (  # noqa: E402
    BlipImageProcessor,
)
from diffusers.pipelines.blip_diffusion.modeling_blip2 import Blip2QFormerModel  # noqa: E402
from diffusers.pipelines.blip_diffusion.modeling_ctx_clip import (  # noqa: E402
    ContextCLIPTextModel,
)
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import BertTokenizer, CLIPTokenizer, CLIPTokenizerFast  # noqa: E402
from transformers.models.blip_2.configuration_blip_2 import Blip2Config  # noqa: E402
from transformers.models.clip.configuration_clip import CLIPTextConfig  # noqa: E402
from transformers.models.clip.tokenization_clip import bytes_to_unicode  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent
CHECKPOINT_DIR = GOLDEN_DIR / "tiny-blipdiffusion"
# The Q-Former config's `tokenizer` field is passed verbatim to BertTokenizer.from_pretrained,
# which resolves a relative path against the *working directory*. The released checkpoint says
# "bert-base-uncased" (a hub id, not shipped). Ours says "qformer_tokenizer", a folder inside the
# checkpoint: this script chdirs into the checkpoint whenever the reference builds or loads the
# Q-Former, and our loader should resolve the field relative to the checkpoint root.
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"

SEED = 0
PROMPT = "swimming underwater"
CATEGORY = "dog"  # used as both the source and the target subject category
NEG_PROMPT = ""  # BlipDiffusionPipeline.__call__'s default neg_prompt
NEG_PROMPT_EXTRA = "low quality, blurry"  # a second, non-empty negative prompt
GUIDANCE_SCALE = 7.5
NUM_INFERENCE_STEPS = 3
HEIGHT = WIDTH = 32  # pixels; the tiny UNet/VAE downsample by 2, so latents are 16x16
PROMPT_STRENGTH = 1.0
PROMPT_REPS = 20
CTX_BEGIN_POS = 2
# OpenAI CLIP normalisation, the values the released model_index.json and the processor use.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Tiny sizes. Q-Former hidden == text hidden == UNet cross-attention dim, as in the release
# (768); the vision width differs from it so cross-attention key/value shapes are exercised.
TEXT_HIDDEN = 32
VISION_HIDDEN = 24
NUM_QUERY_TOKENS = 16
IMAGE_SIZE = 32
PATCH_SIZE = 8
TEXT_MAX_POSITIONS = 77

# Words that get whole-word BPE merges in the tiny CLIP vocab; anything else falls back to
# byte-level characters, which the tokenizer handles the same way.
CLIP_WORDS = ["dog", "swimming", "underwater", "cat", "photo", "of", "the", "in", "low", "quality"]
BERT_WORDS = ["dog", "cat", "photo", "of", "the", "a", "in", "swimming", "underwater"]


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def write_bert_vocab(folder: Path) -> None:
    """Write a tiny uncased WordPiece vocab: specials, words, single letters, ## letters."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "."]
    tokens += [w for w in BERT_WORDS if w not in letters] + letters + [f"##{c}" for c in letters]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n")
    BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=512).save_pretrained(folder)


def write_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """Write a tiny CLIP BPE tokenizer with the same vocab layout as openai/clip.

    Order as in the real vocab: 256 byte symbols, the same with "</w>", one entry per merge,
    then <|startoftext|> and <|endoftext|> last (so EOS has the highest id, which the
    reference's argmax pooling relies on).
    """
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in CLIP_WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            merges.append(f"{merged} {part}")
            merged += part
            if merged not in vocab:
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # pad_token is <|endoftext|>, as in the Stable Diffusion 1.5 tokenizer the release reuses.
    return CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        pad_token="<|endoftext|>",
        model_max_length=TEXT_MAX_POSITIONS,
    )


def make_reference_image() -> Image.Image:
    """A deterministic 56x40 RGB image (not square, not 32x32, so the resize is exercised)."""
    h, w = 40, 56
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255.0 * x / (w - 1)
    g = 255.0 * y / (h - 1)
    b = 127.5 + 127.5 * np.sin(x / 3.0) * np.cos(y / 5.0)
    disk = (x - 30.0) ** 2 / 14.0**2 + (y - 18.0) ** 2 / 10.0**2 <= 1.0
    r[disk], g[disk], b[disk] = 200.0, 120.0, 40.0
    rgb = np.stack([r, g, b], axis=-1).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb, mode="RGB")


def _randomize(module: torch.nn.Module, generator: torch.Generator, matrices: bool) -> None:
    """Give every parameter non-trivial values so parity exercises it.

    Default inits leave biases at 0, norm weights at 1 and the query tokens at 0, which would
    hide a missing bias or a skipped norm. Norms get 1 + 0.1 N(0,1) / 0.1 N(0,1); other 1-D
    parameters 0.1 N(0,1); if `matrices`, N-D parameters get N(0, 1/fan_in).
    """
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=generator)
                if isinstance(mod, norm_types):
                    p.copy_(1.0 + 0.1 * noise if name == "weight" else 0.1 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                elif matrices:
                    fan_in = int(np.prod(p.shape[1:]))
                    p.copy_(noise / fan_in**0.5)


def build_pipeline(tokenizer: CLIPTokenizer) -> BlipDiffusionPipeline:
    """Build the tiny pipeline from the reference classes, configs shaped like the release."""
    generator = torch.Generator().manual_seed(SEED)
    bert_vocab = (CHECKPOINT_DIR / QFORMER_TOKENIZER_DIR / "vocab.txt").read_text().split()

    text_encoder = ContextCLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            projection_dim=TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TEXT_MAX_POSITIONS,
            hidden_act="quick_gelu",
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    qformer_config = Blip2Config(
        # Same keys as the release's conversion script (1024 wide, 23 layers, 16 heads, 224/14).
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "intermediate_size": 4 * VISION_HIDDEN,
            "hidden_act": "quick_gelu",
        },
        qformer_config={
            "cross_attention_frequency": 1,  # every layer cross-attends, as released
            "encoder_hidden_size": VISION_HIDDEN,
            "vocab_size": len(bert_vocab) + 1,  # +1 for the [DEC] token the model adds
            "hidden_size": TEXT_HIDDEN,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 4 * TEXT_HIDDEN,
            "max_position_embeddings": 32,
        },
        num_query_tokens=NUM_QUERY_TOKENS,
        tokenizer=QFORMER_TOKENIZER_DIR,
    )
    with _working_directory(CHECKPOINT_DIR):
        qformer = Blip2QFormerModel(qformer_config)
    unet = UNet2DConditionModel(
        sample_size=HEIGHT // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,  # legacy name: this is the number of heads, as in SD 1.5
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=HEIGHT,
        scaling_factor=0.18215,
    )
    _randomize(text_encoder, generator, matrices=True)
    _randomize(qformer, generator, matrices=True)
    _randomize(unet, generator, matrices=False)
    _randomize(vae, generator, matrices=False)
    # Exactly the scheduler the release's conversion script builds (steps_offset stays 0).
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    image_processor = BlipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD
    )
    return BlipDiffusionPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        qformer=qformer,
        image_processor=image_processor,
        ctx_begin_pos=CTX_BEGIN_POS,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    )


class _LoadablePipeline(BlipDiffusionPipeline):
    """BlipDiffusionPipeline with diffusers 0.33.1's loader bug worked around (issue 11563).

    The released model_index.json sets `mean` and `std`; 0.33.1's from_pretrained type check
    looks up an annotation for every init kwarg, finds none for `List[float]` and raises
    KeyError('mean'). Marking them "unannotated" skips that check and nothing else.
    """

    @classmethod
    def _get_signature_types(cls):
        types = super()._get_signature_types()
        for name in ("mean", "std"):
            types.setdefault(name, (inspect.Signature.empty,))
        return types


class _Recorder:
    """Collects tensors (float32/int64, CPU) and the description of each for golden.json."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, dict] = {}

    def add(self, name: str, value, meaning: str, produced_by: str) -> torch.Tensor:
        tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
        tensor = tensor.detach().cpu().clone().contiguous()  # own storage, as safetensors wants
        if tensor.is_floating_point():
            tensor = tensor.float()
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} has non-finite values")
        self.tensors[name] = tensor
        self.meta[name] = {
            "shape": list(tensor.shape),
            "dtype": str(tensor.dtype).replace("torch.", ""),
            "meaning": meaning,
            "produced_by": produced_by,
        }
        return tensor


@torch.no_grad()
def record_conditioning(pipe: BlipDiffusionPipeline, image: Image.Image, rec: _Recorder) -> dict:
    """Record the image processor, Q-Former and context text encoder; returns prompt facts."""
    nq = pipe.qformer.config.num_query_tokens
    max_positions = pipe.text_encoder.text_model.config.max_position_embeddings

    pixel_values = rec.add(
        "pixel_values",
        pipe.image_processor.preprocess(
            image, image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors="pt"
        )["pixel_values"],
        "reference image after BlipImageProcessor: resize to 32x32 (PIL bicubic, uint8), "
        "*1/255, normalise with CLIP mean/std, centre crop (a no-op), CHW",
        "pipe.image_processor.preprocess(Image.open('reference.png').convert('RGB'), "
        "image_mean=pipe.config.mean, image_std=pipe.config.std, return_tensors='pt')['pixel_values']",
    )
    qf_tokens = pipe.qformer.tokenizer([CATEGORY], return_tensors="pt", padding=True)
    rec.add(
        "qformer_input_ids",
        qf_tokens.input_ids,
        "BERT ids of the source category: [CLS] dog [SEP]",
        f"pipe.qformer.tokenizer([{CATEGORY!r}], return_tensors='pt', padding=True).input_ids",
    )
    rec.add(
        "vision_last_hidden_state",
        pipe.qformer.visual_encoder(pixel_values).last_hidden_state,
        "vision encoder output after post_layernorm; CLS token first, then 4x4 patches",
        "pipe.qformer.visual_encoder(pixel_values).last_hidden_state",
    )
    qformer_out = pipe.qformer(text_input=[CATEGORY], image_input=pixel_values, return_dict=True)
    rec.add(
        "qformer_last_hidden_state",
        qformer_out.last_hidden_state,
        "Q-Former output for [16 queries; BERT text tokens], before the projection",
        f"pipe.qformer(text_input=[{CATEGORY!r}], image_input=pixel_values, "
        "return_dict=True).last_hidden_state",
    )
    query_output = rec.add(
        "qformer_query_output",
        qformer_out.last_hidden_state[:, :nq],
        "Q-Former output at the 16 query positions, before proj_layer",
        "qformer_last_hidden_state[:, :num_query_tokens]",
    )
    subject_embeds = rec.add(
        "subject_embeds",
        pipe.get_query_embeddings(pixel_values, [CATEGORY]),
        "projected subject embeddings (what get_query_embeddings returns)",
        f"pipe.get_query_embeddings(pixel_values, [{CATEGORY!r}]) "
        "== pipe.qformer.proj_layer(qformer_query_output)",
    )
    torch.testing.assert_close(pipe.qformer.proj_layer(query_output), subject_embeds)

    built = pipe._build_prompt([PROMPT], [CATEGORY], PROMPT_STRENGTH, PROMPT_REPS)
    cond_ids = rec.add(
        "cond_input_ids",
        pipe.tokenizer(
            built,
            padding="max_length",
            truncation=True,
            max_length=max_positions - nq,
            return_tensors="pt",
        ).input_ids,
        "CLIP ids of the built prompt, truncated/padded to 77 - 16 = 61 (BOS ... EOS, pad=EOS)",
        "pipe.tokenizer(pipe._build_prompt([prompt], [category], 1.0, 20), padding='max_length', "
        "truncation=True, max_length=77 - 16, return_tensors='pt').input_ids",
    )
    rec.add(
        "cond_input_embeds",
        pipe.text_encoder.text_model.embeddings(
            input_ids=cond_ids, ctx_embeddings=subject_embeds, ctx_begin_pos=[CTX_BEGIN_POS]
        ),
        "text-encoder input: token embeddings with subject_embeds inserted at position 2, "
        "plus position embeddings 0..76 over the whole spliced sequence",
        "pipe.text_encoder.text_model.embeddings(input_ids=cond_input_ids, "
        "ctx_embeddings=subject_embeds, ctx_begin_pos=[2])",
    )
    cond_embeds = rec.add(
        "cond_embeds",
        pipe.encode_prompt(subject_embeds, built, device="cpu"),
        "context text-encoder last_hidden_state (after final_layer_norm) for the built prompt "
        "with subject_embeds spliced in",
        "pipe.encode_prompt(subject_embeds, built_prompt) == pipe.text_encoder("
        "input_ids=cond_input_ids, ctx_embeddings=subject_embeds, ctx_begin_pos=[2])[0]",
    )
    torch.testing.assert_close(
        pipe.text_encoder(
            input_ids=cond_ids, ctx_embeddings=subject_embeds, ctx_begin_pos=[CTX_BEGIN_POS]
        )[0],
        cond_embeds,
    )

    for suffix, neg in (("", NEG_PROMPT), ("_extra", NEG_PROMPT_EXTRA)):
        ids = rec.add(
            f"uncond_input_ids{suffix}",
            pipe.tokenizer(
                [neg], padding="max_length", max_length=max_positions, return_tensors="pt"
            ).input_ids,
            f"CLIP ids of the negative prompt {neg!r}, padded to 77 (no truncation flag)",
            f"pipe.tokenizer([{neg!r}], padding='max_length', max_length=77, "
            "return_tensors='pt').input_ids",
        )
        rec.add(
            f"uncond_embeds{suffix}",
            pipe.text_encoder(input_ids=ids, ctx_embeddings=None)[0],
            f"text-encoder last_hidden_state for the negative prompt {neg!r}, no subject",
            f"pipe.text_encoder(input_ids=uncond_input_ids{suffix}, ctx_embeddings=None)[0]",
        )

    return {
        "built_prompt": built[0],
        "cond_tokens": pipe.tokenizer.convert_ids_to_tokens(cond_ids[0].tolist()),
        "qformer_tokens": pipe.qformer.tokenizer.convert_ids_to_tokens(
            qf_tokens.input_ids[0].tolist()
        ),
        "qformer_dec_token_id": pipe.qformer.tokenizer.convert_tokens_to_ids("[DEC]"),
    }


@torch.no_grad()
def record_generation(pipe: BlipDiffusionPipeline, image: Image.Image, rec: _Recorder) -> dict:
    """Record one UNet call, the 3-step denoising loop, the pipeline call and a VAE encode.

    Needs `rec` to hold cond_embeds and uncond_embeds already (see record_conditioning).
    """
    # Latents: the pipeline calls randn_tensor(shape, generator=torch.Generator('cpu')
    # .manual_seed(seed), device='cpu', dtype=float32), i.e. torch.randn on that generator,
    # then multiplies by scheduler.init_noise_sigma (1.0 for PNDM).
    scale_down = 2 ** (len(pipe.unet.config.block_out_channels) - 1)
    latent_shape = (1, pipe.unet.config.in_channels, HEIGHT // scale_down, WIDTH // scale_down)
    init_latents = rec.add(
        "init_latents",
        randn_tensor(
            latent_shape,
            generator=torch.Generator("cpu").manual_seed(SEED),
            device=torch.device("cpu"),
            dtype=torch.float32,
        ),
        "initial noise of the generation, before * init_noise_sigma (= 1.0)",
        f"torch.randn((1, 4, 16, 16), generator=torch.Generator('cpu').manual_seed({SEED}), "
        "dtype=torch.float32)",
    )
    text_embeddings = torch.cat([rec.tensors["uncond_embeds"], rec.tensors["cond_embeds"]])
    scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(NUM_INFERENCE_STEPS)
    timesteps = rec.add(
        "timesteps",
        scheduler.timesteps,
        "PNDM (PLMS, skip_prk_steps) timesteps for 3 steps: 4 entries, the first step repeated",
        "PNDMScheduler.from_config(pipe.scheduler.config); set_timesteps(3); .timesteps",
    )
    rec.add(
        "unet_noise_pred",
        pipe.unet(
            torch.cat([init_latents] * 2),
            timestep=timesteps[0],
            encoder_hidden_states=text_embeddings,
        ).sample,
        "one UNet call: batch [uncond, cond], latents init_latents twice, t = timesteps[0]",
        "pipe.unet(torch.cat([init_latents] * 2), timestep=timesteps[0], "
        "encoder_hidden_states=torch.cat([uncond_embeds, cond_embeds])).sample",
    )

    # The denoising loop of BlipDiffusionPipeline.__call__, step by step.
    latents = init_latents * scheduler.init_noise_sigma
    step_noise, step_latents = [], []
    for t in scheduler.timesteps:
        noise_uncond, noise_text = pipe.unet(
            torch.cat([latents] * 2), timestep=t, encoder_hidden_states=text_embeddings
        ).sample.chunk(2)
        noise = noise_uncond + GUIDANCE_SCALE * (noise_text - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
        step_noise.append(noise)
        step_latents.append(latents)
    rec.add(
        "step_guided_noise_pred",
        torch.stack(step_noise),
        "per timestep: uncond + 7.5 * (cond - uncond) noise prediction fed to scheduler.step",
        "loop over timesteps as in __call__ (see make_golden.record_generation)",
    )
    rec.add(
        "step_latents",
        torch.stack(step_latents),
        "per timestep: scheduler.step(...).prev_sample; the last one is what the VAE decodes",
        "loop over timesteps as in __call__ (see make_golden.record_generation)",
    )
    decoded = rec.add(
        "vae_decoded",
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0],
        "VAE decoder output in about [-1, 1], before postprocess",
        "pipe.vae.decode(step_latents[-1] / vae.config.scaling_factor, return_dict=False)[0]",
    )
    image_np = rec.add(
        "image",
        pipe(
            PROMPT,
            image,
            CATEGORY,
            CATEGORY,
            guidance_scale=GUIDANCE_SCALE,
            height=HEIGHT,
            width=WIDTH,
            num_inference_steps=NUM_INFERENCE_STEPS,
            generator=torch.Generator("cpu").manual_seed(SEED),
            neg_prompt=NEG_PROMPT,
            prompt_strength=PROMPT_STRENGTH,
            prompt_reps=PROMPT_REPS,
            output_type="np",
        ).images,
        "the pipeline's 3-step generation, NHWC in [0, 1] = (vae_decoded / 2 + 0.5).clamp(0, 1)",
        f"pipe({PROMPT!r}, reference_image, {CATEGORY!r}, {CATEGORY!r}, guidance_scale=7.5, "
        f"height=32, width=32, num_inference_steps=3, generator=torch.Generator('cpu')"
        f".manual_seed({SEED}), neg_prompt='', output_type='np').images",
    )
    # The hand-written loop above must reproduce the pipeline call exactly.
    torch.testing.assert_close(
        image_np, (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), rtol=0, atol=1e-6
    )

    vae_input = rec.add(
        "vae_encode_input",
        image_np.permute(0, 3, 1, 2) * 2 - 1,
        "VAE encoder input: the generated image back in NCHW [-1, 1]",
        "image.permute(0, 3, 1, 2) * 2 - 1",
    )
    dist = pipe.vae.encode(vae_input).latent_dist
    rec.add(
        "vae_latent_mean",
        dist.mean,
        "VAE posterior mean (unscaled)",
        "pipe.vae.encode(vae_encode_input).latent_dist.mean",
    )
    rec.add(
        "vae_latent_std",
        dist.std,
        "VAE posterior std (logvar clamped to [-30, 20])",
        "pipe.vae.encode(vae_encode_input).latent_dist.std",
    )

    return {
        "scheduler_init_noise_sigma": float(scheduler.init_noise_sigma),
        "latent_scale_down_factor": scale_down,
    }


def check_fast_tokenizer(pipe: BlipDiffusionPipeline, built_prompt: str) -> bool:
    """True if the fast CLIP tokenizer (the only one in transformers 5) gives the slow one's ids."""
    fast = CLIPTokenizerFast.from_pretrained(CHECKPOINT_DIR / "tokenizer")
    max_positions = pipe.text_encoder.text_model.config.max_position_embeddings
    cases = (
        (built_prompt, max_positions - pipe.qformer.config.num_query_tokens),
        (NEG_PROMPT, max_positions),
        (NEG_PROMPT_EXTRA, max_positions),
    )
    kwargs = {"padding": "max_length", "truncation": True}
    return all(
        fast(text, max_length=n, **kwargs).input_ids
        == pipe.tokenizer(text, max_length=n, **kwargs).input_ids
        for text, n in cases
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    if CHECKPOINT_DIR.exists():
        shutil.rmtree(CHECKPOINT_DIR)
    write_bert_vocab(CHECKPOINT_DIR / QFORMER_TOKENIZER_DIR)
    tokenizer = write_clip_tokenizer(GOLDEN_DIR / "_clip_tokenizer_tmp")
    shutil.rmtree(GOLDEN_DIR / "_clip_tokenizer_tmp")

    build_pipeline(tokenizer).save_pretrained(CHECKPOINT_DIR, safe_serialization=True)
    image_path = GOLDEN_DIR / "reference.png"
    make_reference_image().save(image_path)

    # Everything below uses the reloaded checkpoint, as a parity test will.
    with _working_directory(CHECKPOINT_DIR):
        pipe = _LoadablePipeline.from_pretrained(CHECKPOINT_DIR, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(image_path).convert("RGB")
    rec = _Recorder()
    facts = record_conditioning(pipe, image, rec)
    facts |= record_generation(pipe, image, rec)
    facts["fast_clip_tokenizer_matches_slow"] = check_fast_tokenizer(pipe, facts["built_prompt"])
    facts["attn_implementation"] = {
        "text_encoder": pipe.text_encoder.config._attn_implementation,
        "qformer": pipe.qformer.config._attn_implementation,
    }

    save_file(rec.tensors, GOLDEN_DIR / "golden.safetensors")
    golden = {
        "generated_by": "tests/golden/make_golden.py (not run by CI)",
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "checkpoint": "tests/golden/tiny-blipdiffusion",
        "qformer_tokenizer": {
            "config_field": QFORMER_TOKENIZER_DIR,
            "resolve": "relative to the checkpoint root (the reference resolves it against the "
            "working directory, so make_golden.py chdirs into the checkpoint to load it)",
        },
        "inputs": {
            "reference_image": {
                "path": "tests/golden/reference.png",
                "size_wh": list(image.size),
                "mode": "RGB",
                "sha256": _sha256(image_path),
            },
            "prompt": PROMPT,
            "source_subject_category": CATEGORY,
            "target_subject_category": CATEGORY,
            "neg_prompt": NEG_PROMPT,
            "neg_prompt_extra": NEG_PROMPT_EXTRA,
            "seed": SEED,
            "guidance_scale": GUIDANCE_SCALE,
            "num_inference_steps": NUM_INFERENCE_STEPS,
            "height": HEIGHT,
            "width": WIDTH,
            "prompt_strength": PROMPT_STRENGTH,
            "prompt_reps": PROMPT_REPS,
            "ctx_begin_pos": CTX_BEGIN_POS,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        },
        "latents_convention": "torch.Generator('cpu').manual_seed(seed); torch.randn(shape, "
        "generator=g, dtype=float32) with shape (1, unet.in_channels, height // f, width // f), "
        "f = 2 ** (len(unet.config.block_out_channels) - 1); then * scheduler.init_noise_sigma",
        "scheduler": {
            "timesteps": rec.tensors["timesteps"].tolist(),
            "config": dict(pipe.scheduler.config),
        },
        "facts": facts,
        "tensors": rec.meta,
    }
    (GOLDEN_DIR / "golden.json").write_text(json.dumps(golden, indent=2, default=str) + "\n")
    total = sum(f.stat().st_size for f in GOLDEN_DIR.rglob("*") if f.is_file())
    print(
        f"wrote {len(rec.tensors)} tensors; tests/golden is {total / 1e6:.2f} MB", file=sys.stderr
    )


if __name__ == "__main__":
    main()
