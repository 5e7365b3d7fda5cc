"""The frozen image encoder: BLIP-2's CLIP-style ViT with pre- and final layer norms.

BLIP-Diffusion uses CLIP ViT-L/14 (23 of its 24 blocks) as BLIP-2's image encoder. CLIP has a
layer norm before the transformer (`pre_layernorm`) and no bias on the patch projection, which
transformers' `Blip2VisionModel` lacks/has, so only the transformer blocks are reused
(`Blip2Encoder`: fused qkv with q/v biases, quick-GELU MLP); the embeddings and norms around
them are declared here with the reference's parameter names.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2VisionConfig
from transformers.models.blip_2.modeling_blip_2 import Blip2Encoder


class VisionEmbeddings(nn.Module):
    """Patchify + class token + learned positions: (B, 3, H, W) -> (B, 1 + (H/p)*(W/p), D)."""

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        num_positions = (config.image_size // patch) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embedding = nn.Conv2d(3, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, num_positions, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(dtype)
        tokens = torch.cat([cls, patches], dim=1)
        return tokens + self.position_embedding[:, : tokens.shape[1]].to(dtype)


class VisionEncoder(nn.Module):
    """Image features for the Q-Former's cross-attention.

    forward: pixel values (B, 3, S, S) float, CLIP-normalised, S = config.image_size
    -> (B, 1 + (S/p)^2, D) after the final layer norm (the reference applies it to every token).
    """

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values must be (B, 3, {size}, {size}), got {tuple(pixel_values.shape)}")
        hidden = self.pre_layernorm(self.embeddings(pixel_values))
        hidden = self.encoder(inputs_embeds=hidden).last_hidden_state
        return self.post_layernorm(hidden)
