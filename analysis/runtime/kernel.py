"""The one attention kernel of kvlens: eager math, grouped queries, slot masks, weights returned.

Compression needs the softmax weights of every step, so compressed caches run under eager
attention. Two things are added to a family's eager code, and nothing else is changed:

- **Grouped queries without copies.** Llama-derived eager code first copies each KV head once per
  query head (``repeat_kv``). Here each KV head is multiplied with its whole query group at once:
  (B, H, G*q, D) @ (B, H, D, C).
- **Slot masks.** A compressed layer's slots are not in position order and some may be free, so the
  causal mask is rebuilt from the slots' positions: query at position p sees a slot iff the slot
  holds a token and its position is <= p. Free slots get exactly zero weight.

``kvlens_attention`` is registered with ``AttentionInterface`` (and the eager mask function under
the same name, so layers that are not compressed keep their causal and sliding-window masks). A
forward pre-hook (``analysis.runtime.cache``) binds each attention module to its compressed layer for the
duration of the call; the function then hands the weights to that layer, which updates its
statistics and compresses. Anything this code does not reproduce (training dropout, soft-capping,
attention sinks, families without ``repeat_kv``) goes to the family's own eager function, given the
same slot mask as an additive mask.
"""

from __future__ import annotations

import sys
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from analysis.ops import attention_scores, masked_softmax

NAME = "kvlens"


_KNOWN_KWARGS = {"scaling", "dropout", "position_ids", "use_cache", "cache_position", "output_attentions",
                 "sliding_window", "past_key_values", "position_embeddings"}


_BOUND: "WeakKeyDictionary[nn.Module, object]" = WeakKeyDictionary()  # attention module -> CompressedLayer


def _family(module: nn.Module):
    return sys.modules[type(module).__module__]


def _plain(module: nn.Module, kwargs: dict) -> bool:
    """True when the family's eager is the standard Llama-style one this module reproduces."""
    family = _family(module)
    return (hasattr(family, "repeat_kv") and isinstance(getattr(module, "num_key_value_groups", None), int)
            and not module.training and getattr(module, "sinks", None) is None
            and set(kwargs) <= _KNOWN_KWARGS and kwargs.get("sliding_window") is None)


def slot_mask(positions: Tensor, query_positions: Tensor) -> Tensor:
    """allowed (B, H, q, C): slot holds a token at a position <= the query's. positions (B, H, C), query (B, q)."""
    held = (positions >= 0)[:, :, None, :]  # (B, H, 1, C)
    if query_positions.shape[-1] == 1:
        return held  # one query, the newest: every held slot is at or before it
    return held & (positions[:, :, None, :] <= query_positions[:, None, :, None])


def slot_attention(query: Tensor, keys: Tensor, values: Tensor, allowed: Tensor | None = None,
                   scaling: float | None = None, mask: Tensor | None = None,
                   softcap: float | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention of query heads over KV slots, eager arithmetic, GQA without copies.

    query (B, Hq, q, D), keys (B, H, C, D), values (B, H, C, Dv); ``allowed`` (B, H, q, C) or
    (B, H, 1, C) bool and/or an additive ``mask`` broadcastable to (B, Hq, q, C). Scores in the
    input dtype, soft-capped (c tanh(s / c)) when ``softcap`` is given (Gemma 2's eager does so
    before the mask), softmax in float32 then cast back, as the families' eager code does.
    Returns output (B, Hq, q, Dv) and weights (B, Hq, q, C).
    """
    B, Hq, q, D = query.shape
    H, C = keys.shape[1], keys.shape[2]
    G = Hq // H
    scaling = scaling or D**-0.5
    grouped = query.reshape(B, H, G * q, D)  # (B, H, G*q, D): query heads of a group are adjacent
    scores = attention_scores(grouped, keys, scaling).view(B, H, G, q, C)  # (B, H, G, q, C)
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:  # (B or 1, 1 or Hq, q, C)
        scores = scores + (mask[:, :, None] if mask.shape[1] == 1 else mask.view(mask.shape[0], H, G, q, C))
    allowed = None if allowed is None else allowed[:, :, None]  # (B, H, 1, q or 1, C)
    weights = masked_softmax(scores, allowed, torch.float32).to(query.dtype)  # (B, H, G, q, C)
    output = weights.view(B, H, G * q, C) @ values  # (B, H, G*q, Dv)
    return output.view(B, Hq, q, -1), weights.view(B, Hq, q, C)


def kvlens_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                     **kwargs) -> tuple[Tensor, Tensor]:
    layer = _BOUND.get(module)
    allowed = None
    if layer is not None:
        state = layer.state
        q = query.shape[2]
        if q == 1:  # the newest token sees every held slot
            allowed = (state.positions >= 0)[:, :, None, :]  # (B, H, 1, C)
        else:
            query_positions = (state.step - q + torch.arange(q, device=query.device)).expand(query.shape[0], q)
            allowed = slot_mask(state.positions, query_positions)  # (B, H, q, C)
    if _plain(module, kwargs):
        mask = None if (attention_mask is None or allowed is not None) else attention_mask[:, :, :, : key.shape[2]]
        output, weights = slot_attention(query, key, value, allowed, kwargs.get("scaling"), mask)
        output = output.transpose(1, 2).contiguous()  # (B, q, Hq, Dv)
    else:
        if allowed is not None:  # the family's own eager, with the slot mask as an additive mask
            G = query.shape[1] // key.shape[1]
            allowed = allowed.repeat_interleave(G, dim=1)  # (B, Hq, q or 1, C)
            attention_mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~allowed, torch.finfo(query.dtype).min)
        output, weights = _family(module).eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if layer is not None:
        layer.after_attention(weights)
    return output, weights


def bind(module: nn.Module, layer) -> None:
    """Route ``module``'s next attention call through ``layer`` (None: unbind)."""
    if layer is None:
        _BOUND.pop(module, None)
    else:
        _BOUND[module] = layer


def register() -> str:
    """Register the function (and the eager mask it expects) with transformers; return its name."""

    AttentionInterface.register(NAME, kvlens_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME
