"""Eager attention for grouped-query models that skips ``repeat_kv`` and still returns weights.

Compression needs the softmax weights of every step, so it runs under eager attention. The eager
code of Llama-derived families first copies each KV head once per query head (``repeat_kv``):
(B, Hq, L, D) copies of keys and values in every layer and step. Here each KV head is multiplied
with its whole query group at once instead: (B, H, G*q, D) @ (B, H, D, L). The arithmetic is the
family's own (scores * scaling + mask, float32 softmax, cast back), and anything this function does
not know (training dropout, soft-capping, attention sinks, families without ``repeat_kv``) is
handed to the family's own eager function.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import Tensor, nn

NAME = "kvlens_grouped_eager"
_KNOWN_KWARGS = {"scaling", "dropout", "position_ids", "use_cache", "cache_position", "output_attentions",
                 "sliding_window", "past_key_values", "position_embeddings"}


def _family(module: nn.Module):
    return sys.modules[type(module).__module__]


def _plain(module: nn.Module, kwargs: dict) -> bool:
    """True when the family's eager is the standard Llama-style one this function reproduces."""
    family = _family(module)
    return (hasattr(family, "repeat_kv") and isinstance(getattr(module, "num_key_value_groups", None), int)
            and not module.training and getattr(module, "sinks", None) is None
            and set(kwargs) <= _KNOWN_KWARGS and kwargs.get("sliding_window") is None)


def grouped_eager(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  **kwargs) -> tuple[Tensor, Tensor]:
    if not _plain(module, kwargs):
        return _family(module).eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    B, Hq, q, D = query.shape
    H, L = key.shape[1], key.shape[2]
    scaling = kwargs.get("scaling") or D**-0.5
    grouped = query.reshape(B, H, (Hq // H) * q, D)  # (B, H, G*q, D): query heads of a group are adjacent
    scores = (grouped @ key.transpose(2, 3)).view(B, Hq, q, L) * scaling  # (B, Hq, q, L)
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)  # (B, Hq, q, L)
    output = weights.view(B, H, (Hq // H) * q, L) @ value  # (B, H, G*q, Dv)
    return output.view(B, Hq, q, -1).transpose(1, 2).contiguous(), weights  # (B, q, Hq, Dv)


def register() -> str:
    """Register the function (and the eager mask it expects) with transformers; return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_eager)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


@contextmanager
def grouped_attention(model: nn.Module):
    """Run an eager model with ``grouped_eager`` inside the block; other implementations are left alone."""
    previous = model.config._attn_implementation
    if previous != "eager":
        yield model
        return
    model.set_attn_implementation(register())
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)
