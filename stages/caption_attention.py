"""Fused attention (torch's scaled_dot_product_attention, SDPA) for BLIP captioners.

transformers' BLIP (models/blip: BlipAttention in the ViT, BlipTextSelfAttention in the BERT text
decoder's self- and cross-attention) has no SDPA path: each attention materialises its softmax
scores. For the ViT at 384 px that is 577 x 577 scores per head and photo: with BLIP-base's 12
heads, about 1 GB per layer for a batch of 128 in float16, written and read several times. `use_sdpa` gives the
model's BLIP attention modules a forward that computes the same thing with SDPA: the same
projections, the same scale (the ViT's `scale`, the text decoder's 1/sqrt(head size)), the same
additive masks, the text decoder's key/value cache used and filled as transformers' own forward
does, dropout only in training. Outputs differ from the eager ones by float rounding alone.

Only modules whose structure is the one this file was written against are patched (the forward's
parameters and the eager score computation in its source; checked against transformers 5.17 and
5.25, whose text attention names its cache `past_key_values` and `cache` respectively). Any other
module keeps its eager forward and the reason is logged. The patched forwards return no attention
weights (None where the eager forward returns the probabilities): the caption stage never asks
for them.

BLIP-2 (Blip2ForConditionalGeneration) is left alone: its ViT, Q-Former and language model go
through transformers' attention interface, SDPA by default.
"""

from __future__ import annotations

import inspect
import logging
import math
import types
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ATTENTION = ("sdpa", "eager")

# The eager score computation each patched forward replaces, as its source spells it.
_VISION_MARKERS = (
    "torch.matmul(query_states, key_states.transpose(-1, -2))",
    "attention_scores * self.scale",
    "softmax(attention_scores, dim=-1)",
    "self.projection(context_layer)",
)
_TEXT_MARKERS = (
    "torch.matmul(query_layer, key_layer.transpose(-1, -2))",
    "/ math.sqrt(self.attention_head_size)",
    "attention_scores + attention_mask",
    "is_updated",
    ".layers[self.layer_idx].keys",
)
_VISION_PARAMS = ("self", "hidden_states", "kwargs")
# The text attention's parameters in transformers 5.25 (cache) and 5.17 (past_key_values).
_TEXT_PARAMS_CACHE = ("self", "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "cache", "kwargs")
_TEXT_PARAMS_PAST = ("self", "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "past_key_values", "kwargs")


def apply_attention(model: nn.Module, attention: str) -> dict[str, int]:
    """The caption stage's data.caption.attention on a loaded captioner: "sdpa" patches its BLIP
    attention modules (`use_sdpa`), "eager" leaves the model as transformers made it. Returns
    the patched modules per kind."""
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, not {attention!r}")
    return use_sdpa(model) if attention == "sdpa" else {"vision": 0, "text": 0}


def use_sdpa(model: nn.Module) -> dict[str, int]:
    """Gives every BLIP attention module of `model` an SDPA forward (the module docstring says
    which and how), in place. Returns how many were patched: {"vision": n, "text": m}."""
    counts = {"vision": 0, "text": 0}
    skipped: dict[str, str] = {}
    for module in model.modules():
        kind = _kind(module)
        if kind is None or "forward" in module.__dict__:
            continue
        forward, reason = _sdpa_forward(type(module), kind)
        if forward is None:
            skipped.setdefault(type(module).__name__, reason)
            continue
        module.forward = types.MethodType(forward, module)
        counts[kind] += 1
    for name, reason in skipped.items():
        log.warning("%s keeps its eager attention: %s", name, reason)
    if not any(counts.values()) and not skipped:
        log.info("no BLIP attention in %s: its attention is left as loaded", type(model).__name__)
    else:
        log.info("SDPA attention in %s: %s", type(model).__name__, counts)
    return counts


def is_patched(module: nn.Module) -> bool:
    """Whether `use_sdpa` gave `module` its forward."""
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) in (_vision_forward, _text_forward_cache, _text_forward_past)


def _kind(module: nn.Module) -> str | None:
    """"vision" for transformers' BlipAttention, "text" for its BlipTextSelfAttention, else None."""
    cls = type(module)
    if not cls.__module__.startswith("transformers.models.blip."):
        return None
    return {"BlipAttention": "vision", "BlipTextSelfAttention": "text"}.get(cls.__name__)


def _sdpa_forward(cls: type, kind: str) -> tuple[Callable[..., Any] | None, str]:
    """The SDPA forward for `cls` when its eager forward is the one this file reimplements, else
    (None, why not)."""
    try:
        source = inspect.getsource(cls.forward)
        params = tuple(inspect.signature(cls.forward).parameters)
    except (OSError, TypeError, ValueError) as e:
        return None, f"its forward cannot be read ({e})"
    markers = _VISION_MARKERS if kind == "vision" else _TEXT_MARKERS
    missing = [m for m in markers if m not in source]
    if missing:
        return None, f"its forward no longer computes {missing[0]!r} (transformers changed it)"
    if kind == "vision":
        return (_vision_forward, "") if params == _VISION_PARAMS else (None, f"unexpected forward parameters {params}")
    if params == _TEXT_PARAMS_CACHE:
        return _text_forward_cache, ""
    if params == _TEXT_PARAMS_PAST:
        return _text_forward_past, ""
    return None, f"unexpected forward parameters {params}"


def _vision_forward(self: nn.Module, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """BlipAttention.forward with SDPA: the fused qkv projection split into heads, unmasked
    attention at `self.scale`, the heads joined and projected."""
    bsz, tokens, embed_dim = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(bsz, tokens, 3, self.num_heads, embed_dim // self.num_heads).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)
    dropout = self.dropout.p if self.training else 0.0
    context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=self.scale)
    context = context.transpose(1, 2).reshape(bsz, tokens, self.embed_dim)
    return self.projection(context), None


def _text_forward_cache(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """BlipTextSelfAttention.forward of transformers 5.25 with SDPA: its cache updated with the
    keyword arguments it is given, as the eager forward does."""

    def update(layer_cache: Any, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return layer_cache.update(key, value, self.layer_idx, kwargs=kwargs)

    mask = encoder_attention_mask if encoder_hidden_states is not None else attention_mask
    return _text_attention(self, hidden_states, mask, encoder_hidden_states, cache, update), None


def _text_forward_past(
    self: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """BlipTextSelfAttention.forward of transformers 5.17 with SDPA: its cache updated with no
    further arguments, as the eager forward does."""

    def update(layer_cache: Any, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return layer_cache.update(key, value, self.layer_idx)

    mask = encoder_attention_mask if encoder_hidden_states is not None else attention_mask
    return _text_attention(self, hidden_states, mask, encoder_hidden_states, past_key_values, update), None


def _text_attention(
    self: nn.Module,
    hidden_states: torch.Tensor,
    mask: torch.Tensor | None,
    encoder_hidden_states: torch.Tensor | None,
    cache: Any,
    update: Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """The text decoder's attention context (batch, tokens, hidden): queries from
    `hidden_states`, keys and values from `encoder_hidden_states` (cross-attention) or
    `hidden_states` (self-attention), through `cache` as the eager forward uses it (below), the
    additive `mask` as given, scale 1/sqrt(head size)."""
    head = self.attention_head_size
    query = self.query(hidden_states).view(*hidden_states.shape[:-1], -1, head).transpose(1, 2)
    key, value = _text_keys_values(self, hidden_states, encoder_hidden_states, cache, update)
    if mask is not None:  # added to the scores, as the eager forward adds it, in their dtype
        mask = mask.to(device=query.device, dtype=query.dtype)
    dropout = self.dropout.p if self.training else 0.0
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=1 / math.sqrt(head))
    return context.transpose(1, 2).reshape(*hidden_states.shape[:-1], self.all_head_size)


def _text_keys_values(
    self: nn.Module,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    cache: Any,
    update: Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values as BlipTextSelfAttention's eager forward makes them: with an
    EncoderDecoderCache, the self-attention appends to its self_attention_cache, the
    cross-attention projects the image once, stores it in its cross_attention_cache and marks the
    layer updated, then reuses it on every later step."""
    from transformers.cache_utils import EncoderDecoderCache

    cross = encoder_hidden_states is not None
    layer_cache = cache
    updated = False
    if isinstance(cache, EncoderDecoderCache):
        updated = cache.is_updated.get(self.layer_idx)
        layer_cache = cache.cross_attention_cache if cross else cache.self_attention_cache
    if cross and cache is not None and updated:
        layer = layer_cache.layers[self.layer_idx]
        return layer.keys, layer.values
    states = encoder_hidden_states if cross else hidden_states
    shape = (*states.shape[:-1], -1, self.attention_head_size)
    key = self.key(states).view(shape).transpose(1, 2)
    value = self.value(states).view(shape).transpose(1, 2)
    if cache is not None:
        key, value = update(layer_cache, key, value)
        if cross and isinstance(cache, EncoderDecoderCache):
            cache.is_updated[self.layer_idx] = True
    return key, value
