"""The subject encoder: image -> Q-Former (with the category text) -> 16 subject embeddings.

Parameter names follow the released `qformer/` weights (diffusers 0.33 `Blip2QFormerModel`):
`embeddings.*` (BERT word/position embeddings + LayerNorm), `visual_encoder.*` (the frozen ViT),
`query_tokens`, `encoder.layer.N.*` and `proj_layer.*`. The transformer blocks are transformers'
maintained `Blip2QFormerEncoder` (self-attention over [queries; text], cross-attention from the
queries to the image features every `cross_attention_frequency` layers, separate feed-forwards
for queries and text); the embeddings, the query tokens and the projection are declared here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import Blip2QFormerConfig, Blip2VisionConfig
from transformers.activations import QuickGELUActivation
from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerEncoder

from pipeline.model.vision import VisionEncoder

ATTN_IMPLEMENTATION = "sdpa"
# Additive mask value for padded text tokens, as the reference's `get_extended_attention_mask`.
_MASKED = -10000.0


def build_qformer_configs(raw: dict[str, Any]) -> tuple[Blip2VisionConfig, Blip2QFormerConfig, int]:
    """Vision config, Q-Former config and number of query tokens from a `qformer/config.json`
    (a serialised Blip2Config)."""
    vision = Blip2VisionConfig.from_dict(copy.deepcopy(raw.get("vision_config") or {}))
    qformer = Blip2QFormerConfig.from_dict(copy.deepcopy(raw.get("qformer_config") or {}))
    # Blip2Config wires these; the released Q-Former also has the text feed-forward (`intermediate`,
    # `output`), which transformers only builds when `use_qformer_text_input` is set.
    qformer.encoder_hidden_size = vision.hidden_size
    qformer.use_qformer_text_input = True
    for config in (vision, qformer):
        config._attn_implementation = ATTN_IMPLEMENTATION
    return vision, qformer, int(raw.get("num_query_tokens", 32))


class QFormerEmbeddings(nn.Module):
    """[query tokens; word + position embeddings of the text] -> LayerNorm -> dropout.

    The queries get no position embedding; text positions start at 0 (reference behaviour).
    (B, Q, D) queries, (B, T) ids -> (B, Q + T, D).
    """

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent, as in the reference, so saved checkpoints carry the same names.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(self, input_ids: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        positions = self.position_ids[:, : input_ids.shape[1]]
        text = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        embeddings = torch.cat([queries, text.to(queries.dtype)], dim=1)
        return self.dropout(self.LayerNorm(embeddings))


class SubjectProjection(nn.Module):
    """x + Dropout(Linear(QuickGELU(Linear(LayerNorm(x))))): (..., D) -> (..., D).

    The reference's ProjLayer; its comment lists the ops in another order, the code is this.
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.1, eps: float = 1e-12) -> None:
        super().__init__()
        self.dense1 = nn.Linear(dim, hidden_dim)
        self.act_fn = QuickGELUActivation()
        self.dense2 = nn.Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.dense2(self.act_fn(self.dense1(self.LayerNorm(x)))))


class SubjectQFormer(nn.Module):
    """BLIP-2 Q-Former with its frozen ViT and BLIP-Diffusion's projection.

    `query_features(pixel_values, input_ids, attention_mask)` -> (B, Q, D) query outputs;
    `forward(...)` -> (B, Q, D) subject embeddings (projected into the CLIP text space, D = 768
    for the released model, matching the text encoder's width).
    """

    def __init__(self, raw_config: dict[str, Any]) -> None:
        super().__init__()
        self.raw_config = raw_config
        vision, qformer, num_query_tokens = build_qformer_configs(raw_config)
        self.vision_config, self.config, self.num_query_tokens = vision, qformer, num_query_tokens
        dim = qformer.hidden_size
        self.embeddings = QFormerEmbeddings(qformer)
        self.visual_encoder = VisionEncoder(vision)
        self.visual_encoder.requires_grad_(False)  # frozen, as in BLIP-Diffusion
        self.query_tokens = nn.Parameter(torch.zeros(1, num_query_tokens, dim))
        self.proj_layer = SubjectProjection(dim, 4 * dim, dropout=0.1, eps=1e-12)
        self.encoder = Blip2QFormerEncoder(qformer)

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's features (B, 1 + N, Dv) of pixel values (B, 3, S, S). Features made
        earlier by this method (B, 1 + N, Dv), e.g. once for a whole training set, pass through."""
        if pixel_values.ndim == 3:
            return pixel_values
        with torch.no_grad():  # the ViT is frozen: keep no activations for backward
            return self.visual_encoder(pixel_values)

    def hidden_states(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Q-Former outputs over [queries; text], before projection: (B, Q + T, D).

        pixel_values: (B, 3, S, S) float, CLIP-normalised, or their `image_features`;
        input_ids / attention_mask: (B, T) BERT ids of the category text and its 0/1 padding mask.
        """
        batch = input_ids.shape[0]
        if pixel_values.shape[0] != batch:
            raise ValueError(f"{pixel_values.shape[0]} images for {batch} category texts; give one text per image")
        image_features = self.image_features(pixel_values)  # (B, 1 + N, Dv)
        dtype = self.query_tokens.dtype
        queries = self.query_tokens.expand(batch, -1, -1)
        hidden = self.embeddings(input_ids, queries)  # (B, Q + T, D)
        keep = torch.cat([attention_mask.new_ones(batch, self.num_query_tokens), attention_mask], dim=1)
        additive = (1.0 - keep[:, None, None, :].to(dtype)) * _MASKED  # (B, 1, 1, Q + T)
        return self.encoder(
            hidden,
            attention_mask=additive,
            encoder_hidden_states=image_features.to(dtype),
            encoder_attention_mask=None,
            query_length=self.num_query_tokens,
        ).last_hidden_state

    def query_features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The query slice of `hidden_states`, before projection: (B, Q, D)."""
        return self.hidden_states(pixel_values, input_ids, attention_mask)[:, : self.num_query_tokens]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Subject embeddings (B, Q, D) for the images and their category texts."""
        return self.proj_layer(self.query_features(pixel_values, input_ids, attention_mask))
