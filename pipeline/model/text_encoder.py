"""The context CLIP text encoder: CLIP's text transformer with subject embeddings spliced in.

The prompt's token embeddings are split at `ctx_begin_pos` (2: after "<bos> a") and the Q subject
embeddings are inserted there, so "a [subject] dog on the beach" is one sequence of T + Q
tokens. Position embeddings then run 0..T+Q-1 over the spliced sequence and CLIP's causal mask
covers all of it, exactly as the reference's ContextCLIPTextModel. The transformer blocks are
transformers' `CLIPEncoder`; names follow the released `text_encoder/` weights
(`text_model.embeddings.*`, `text_model.encoder.layers.N.*`, `text_model.final_layer_norm.*`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import CLIPTextConfig
from transformers.models.clip.modeling_clip import CLIPEncoder

from pipeline.model.prompts import CONTEXT_BEGIN_POS

ATTN_IMPLEMENTATION = "sdpa"


def build_text_config(raw: dict[str, Any]) -> CLIPTextConfig:
    config = CLIPTextConfig.from_dict(copy.deepcopy(raw))
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


class ContextTextEmbeddings(nn.Module):
    """Token embeddings with the subject embeddings inserted, plus positions.

    input_ids (B, T) int64, ctx (B, Q, D) or None -> (B, T + Q, D).
    """

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Persistent, as in the reference, so saved checkpoints carry the same names.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)))

    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: torch.Tensor | None,
        ctx_begin_pos: int | Sequence[int] | SubjectSlots,
        plain_ids: torch.Tensor | None = None,
        plain_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        tokens = self.token_embedding(input_ids)  # (B, T, D)
        if ctx is not None:
            tokens = insert_context(tokens, ctx.to(tokens.dtype), ctx_begin_pos)
        if plain_rows is not None:
            # Rows without the subject take their plain prompt's embeddings, (B, T + Q) ids long.
            plain = self.token_embedding(plain_ids)
            if plain.shape != tokens.shape:
                raise ValueError(f"plain prompts {tuple(plain_ids.shape)} do not fill the {tuple(tokens.shape[:2])} positions")
            tokens = torch.where(plain_rows[:, None, None], plain, tokens)
        length = tokens.shape[1]
        if length > self.position_ids.shape[1]:
            raise ValueError(
                f"prompt of {input_ids.shape[1]} tokens plus {length - input_ids.shape[1]} subject "
                f"embeddings exceeds the text encoder's {self.position_ids.shape[1]} positions"
            )
        return tokens + self.position_embedding(self.position_ids[:, :length])


@dataclass(frozen=True)
class SubjectSlots:
    """Where several subjects go in every row: K token positions, ascending, each before the
    token the subject's Q embeddings precede ("a [dog] next to a [cat]": after "<bos> a" and
    after "<bos> a dog next to a"). The context is then (B, K * Q, D), the K subjects in order."""

    positions: tuple[int, ...]


def insert_context(
    tokens: torch.Tensor, ctx: torch.Tensor, ctx_begin_pos: int | Sequence[int] | SubjectSlots
) -> torch.Tensor:
    """Splice ctx (B, Q, D) into tokens (B, T, D) before position `ctx_begin_pos` -> (B, T + Q, D).

    `ctx_begin_pos` is one position for the batch, one per row, or SubjectSlots: then ctx is
    (B, K * Q, D) and its K parts go before their K positions -> (B, T + K * Q, D).
    """
    if ctx.ndim != 3 or ctx.shape[0] != tokens.shape[0] or ctx.shape[2] != tokens.shape[2]:
        raise ValueError(
            f"subject embeddings must be (B={tokens.shape[0]}, Q, D={tokens.shape[2]}), got {tuple(ctx.shape)}"
        )
    if isinstance(ctx_begin_pos, SubjectSlots):
        positions = ctx_begin_pos.positions
        if not positions or ctx.shape[1] % len(positions) or list(positions) != sorted(positions):
            raise ValueError(f"{ctx.shape[1]} subject embeddings do not split over ascending slots {positions}")
        parts, pieces, start = ctx.split(ctx.shape[1] // len(positions), dim=1), [], 0
        for part, position in zip(parts, positions, strict=True):
            pieces += [tokens[:, start:position], part]
            start = position
        return torch.cat([*pieces, tokens[:, start:]], dim=1)
    if isinstance(ctx_begin_pos, int):
        return torch.cat([tokens[:, :ctx_begin_pos], ctx, tokens[:, ctx_begin_pos:]], dim=1)
    if len(ctx_begin_pos) != tokens.shape[0]:
        raise ValueError(f"{len(ctx_begin_pos)} context positions for a batch of {tokens.shape[0]}")
    rows = [torch.cat([t[:p], c, t[p:]], dim=0) for t, c, p in zip(tokens, ctx, ctx_begin_pos, strict=True)]
    return torch.stack(rows)


class ContextTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = ContextTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        # The reference builds this norm with nn.LayerNorm's default eps (1e-5), not the config's.
        self.final_layer_norm = nn.LayerNorm(config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        ctx: torch.Tensor | None,
        ctx_begin_pos: int | Sequence[int] | SubjectSlots,
        plain_ids: torch.Tensor | None = None,
        plain_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embeddings(input_ids, ctx, ctx_begin_pos, plain_ids, plain_rows)  # (B, L, D)
        length, dtype = hidden.shape[1], hidden.dtype
        # CLIP's causal mask over the whole spliced sequence, subject tokens included: (1, 1, L, L).
        causal = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=hidden.device)
        causal = causal.triu(1)[None, None]
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state
        return self.final_layer_norm(hidden)


class ContextCLIPTextModel(nn.Module):
    """CLIP text encoder taking subject embeddings.

    forward(input_ids (B, T) int64, ctx_embeddings (B, Q, D) or None, ctx_begin_pos)
    -> hidden states (B, T + Q, D) float, the UNet's `encoder_hidden_states`. Training may add
    plain_ids (B, T + Q) int64 and plain_rows (B,) bool: those rows encode plain_ids instead
    (the prompt without the subject), in the same batch.
    """

    def __init__(self, raw_config: dict[str, Any]) -> None:
        super().__init__()
        self.raw_config = raw_config
        self.config = build_text_config(raw_config)
        self.text_model = ContextTextTransformer(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        ctx_embeddings: torch.Tensor | None = None,
        ctx_begin_pos: int | Sequence[int] | SubjectSlots = CONTEXT_BEGIN_POS,
        plain_ids: torch.Tensor | None = None,
        plain_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.text_model(input_ids, ctx_embeddings, ctx_begin_pos, plain_ids, plain_rows)
