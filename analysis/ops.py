"""The shared maths of kvlens, each piece written once.

Every study compares numbers produced by different code paths (the cache inside the model, the
teacher-forced replay, the perturbation study, the capture). Where they compute the same quantity
they call the same function here, so they cannot drift apart. Each function keeps the exact order of
floating-point operations its callers had (recorded outputs are compared bit for bit): where callers
differed, the difference is a parameter or stays visible at the call site.

This module sits in the bottom layers: it imports only torch and the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

FAR = 2**62  # larger than any position: "no slot" in position arithmetic


def query_groups(values: Tensor, kv_heads: int, dim: int = 1) -> Tensor:
    """Split the query-head axis ``dim`` (Hq) into (kv_heads, G): (.., Hq, ..) -> (.., H, G, ..).

    Query head h belongs to KV head h // G (a GQA group's heads are adjacent), as in every family's
    ``repeat_kv``. A view where the layout allows one.
    """
    shape = values.shape
    heads = shape[dim]
    if kv_heads <= 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads do not split into {kv_heads} equal KV-head groups")
    dim = dim % values.dim()
    return values.reshape(*shape[:dim], kv_heads, heads // kv_heads, *shape[dim + 1 :])


def group_mean(values: Tensor, kv_heads: int, dim: int = 1) -> Tensor:
    """Average the query heads of each GQA group along ``dim``: (.., Hq, ..) -> (.., kv_heads, ..) float32.

    Each query's row stays a distribution over the slots, so per-KV-head scores keep the paper's
    scale whatever the group size.
    """
    return query_groups(values.float(), kv_heads, dim).mean(dim=dim % values.dim() + 1)


def relative_error(approx: Tensor, exact: Tensor) -> Tensor:
    """||approx - exact|| / ||exact|| over the last dim; an exact zero vector divides by 1e-30, not 0."""
    return (approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)


def attention_scores(queries: Tensor, keys: Tensor, scaling: float | None = None) -> Tensor:
    """q k^T over the last two dims, scaled: (.., Q, D) x (.., L, D) -> (.., Q, L).

    Two conventions, kept apart because they round differently: the study's float32 recomputations
    divide by sqrt(D) (``scaling`` None); the families' eager code, and what reproduces it, multiplies
    by its ``scaling`` (D**-0.5 unless the config says otherwise).
    """
    product = queries @ keys.transpose(-1, -2)
    return product / math.sqrt(queries.shape[-1]) if scaling is None else product * scaling


@dataclass(frozen=True)
class AttentionSpec:
    """How a layer turns q·k into weights, as the model's attention call is told (``scaling``, ``softcap``,
    ``sliding_window`` keyword arguments): what a recomputation from captured q/k/v must apply.

    ``scaling`` None: 1/sqrt(D) (the study convention of ``attention_scores``); ``softcap`` c:
    scores -> c tanh(scores / c) (Gemma 2), after scaling, before the mask; ``window`` W: query p sees
    key k iff p - W < k <= p (transformers' sliding-window mask), None: full causal attention.
    """

    scaling: float | None = None
    softcap: float | None = None
    window: int | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "AttentionSpec":
        d = d or {}
        return cls(d.get("scaling"), d.get("softcap"), d.get("window"))

    def to_dict(self) -> dict:
        return {"scaling": self.scaling, "softcap": self.softcap, "window": self.window}


def attention_logits(queries: Tensor, keys: Tensor, spec: AttentionSpec | None = None) -> Tensor:
    """``attention_scores`` with the layer's own scaling and soft-cap (``spec``; None: 1/sqrt(D), no cap)."""
    scores = attention_scores(queries, keys, spec.scaling if spec is not None else None)
    if spec is not None and spec.softcap:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    return scores


def visible(query_positions: Tensor, key_positions: Tensor, window: int | None = None) -> Tensor:
    """(Q, L) bool: key position k is visible to query position p iff k <= p (and p - W < k with a window)."""
    q, k = query_positions[:, None], key_positions[None, :]
    allowed = k <= q
    return allowed if window is None else allowed & (k > q - window)


def masked_softmax(scores: Tensor, allowed: Tensor | None, dtype: torch.dtype | None = None) -> Tensor:
    """Softmax over the last dim with the slots where ``allowed`` is False at exactly zero weight.

    ``allowed`` broadcasts against ``scores`` (None: every slot). ``dtype`` is the softmax's own
    (the families' eager code takes it in float32 whatever the scores' dtype). A row with no allowed
    slot has no distribution: it comes out NaN, so callers must always allow at least one slot.
    """
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(dim=-1, dtype=dtype)


def running_mean(values: Tensor) -> Tensor:
    """Mean of the first 1, 2, .. n entries along the last dim, in float64 (a running log-perplexity)."""
    n = values.shape[-1]
    return values.double().cumsum(-1) / torch.arange(1, n + 1, dtype=torch.float64, device=values.device)


def convex_merge(w_a: Tensor, v_a: Tensor, w_b: Tensor, v_b: Tensor, active: Tensor) -> Tensor:
    """WeightedKV's merge (w_a v_a + w_b v_b) / (w_a + w_b), in the inputs' dtype.

    Where ``active`` is False or the weights sum to 0 (nobody attended to either), ``v_b`` is kept:
    0 / 0 never reaches a cache.
    """
    total = w_a + w_b
    mixed = (w_a * v_a + w_b * v_b) / total
    return torch.where((total > 0) & active, mixed, v_b)


def uncompressed_prefix(length: int, budgets: Iterable[int | None]) -> int:
    """How many leading tokens of a ``length``-token sequence no row can compress: they may go in chunks.

    A row with budget b holds every token until it has b, so the first min(b) tokens of all rows are
    exactly the uncompressed model's; ``None`` is a row that never compresses. The last token is
    never fed (it has nothing to predict), hence at most length - 1.
    """
    return min([length - 1] + [b for b in budgets if b is not None])


def seen_counts(positions: Tensor, first: Tensor | int, q: int, window: int | None = None) -> Tensor:
    """How many of the q queries at positions first .. first+q-1 see each slot: float32, shaped like ``positions``.

    Causal by structure: a held slot (position >= 0) is seen by every query at or after its position
    (and, with a sliding ``window``, less than ``window`` positions after it), so a weight that
    underflows to 0 still counts as "seen". In closed form per slot, with no (q, C) mask. Shared by
    the cache statistics and the capture.
    """
    last = first + q  # one past the newest query
    until = last if window is None else torch.minimum(torch.as_tensor(last), positions + window)
    seen = (until - torch.clamp(positions, min=first)).clamp_min(0)
    return torch.where(positions >= 0, seen, 0).float()


def uniform(*keys) -> Tensor:
    """Deterministic uniform [0, 1) draws from integer keys (ints or int64 tensors, broadcast).

    A counter-based hash: the draw for (seed, window, layer, head, step, slot) does not depend on
    which other rows share the batch, on the batch size or on the device, so randomised methods give
    each window the same result however it is batched. Every intermediate stays below 2**62.

    Python-int keys are folded on the host until the first tensor key, and enter later as scalar
    operands: no tensor is made on the host and nothing moves between devices (no sync per step).
    """
    h = 0  # a Python int until the first tensor key, then a tensor on that key's device
    for key in keys:
        if isinstance(key, Tensor) and key.dtype != torch.long:
            key = key.long()
        key = key & 0x7FFFFFFF
        for _ in range(2):
            h = ((h ^ key) * 1540483477 + 0x2545F491) % 2147483647
            h = h ^ (h >> 13)
    h = h if isinstance(h, Tensor) else torch.tensor(h)  # only int keys: no device to be on
    return h.float() / 2147483647.0
