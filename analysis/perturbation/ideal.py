"""How much of the paper's ideal merge (§III-B) does the convex merge keep?

At step t the uncompressed cache of tokens 0..t-1 (``analysis.perturbation.one_step.state_at``) gives up
WeightedKV's victim j (lowest average attention, the policy's own ``select``); its key goes and its
value is folded into the right neighbour n in four ways:

- ``ideal``: the exact ṽ that leaves the merging query's output unchanged. With e_i = exp(s_i), s_i the
  layer's own score of key i (q·k_i/√d unless the model scales or soft-caps otherwise),
  and o that query's full output, ṽ = (e_j / e_n)(v_j - o) + v_n (the paper's formula, rewritten).
  It depends on the query: for GQA each query head gets its own ṽ (the best case for the ideal).
- ``convex_query``: the paper's approximation, ṽ = (e_j v_j + e_n v_n) / (e_j + e_n), with the
  merging query's own weights (again per query head).
- ``weightedkv``: the policy's merge (average-attention weights, per KV head).
- ``evict``: v_n unchanged.

The merging query is the newest one, at position t - 1 (in ``CompressedCache`` a step compresses
after that token's attention). We score its output and the next F captured queries (tokens t..t+F-1
appended uncompressed): relative error ``||o - o_full|| / ||o_full||``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.compress import WeightedKV
from analysis.compress.weightedkv import right_neighbour
from analysis.ops import AttentionSpec, attention_logits, group_mean, masked_softmax, relative_error, visible
from analysis.perturbation.one_step import state_at

VARIANTS = ("ideal", "convex_query", "weightedkv", "evict")


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, spec: AttentionSpec) -> tuple[Tensor, Tensor]:
    """q (B, Hq, Q, D), k/v (B, Hq, L, ·), allowed (B, Hq, Q, L) -> outputs (B, Hq, Q, Dv), scores.

    Scores multiplied by the layer's scaling (D**-0.5 unless the model says otherwise), as the kernel
    does, then soft-capped where the layer is."""
    scaled = AttentionSpec(spec.scaling or q.shape[-1] ** -0.5, spec.softcap, spec.window)
    scores = attention_logits(q, k, scaled)
    return masked_softmax(scores, allowed) @ v, scores


def ideal_errors(capture, layer: int, t: int, future: int, sinks: int = 4, recent: int | None = None,
                 row: int = 0) -> dict[str, Tensor]:
    """Per variant: relative error (Hq, F + 1) at the merging query (column 0) and the next F queries."""
    state = state_at(capture, layer, t, row)  # fresh: slot i holds position i
    policy = WeightedKV(t - 1, sinks, recent)
    victim = policy.select(state)  # (1, H)
    neighbour = right_neighbour(state, victim)  # (1, H)
    merged = state.clone()
    policy.merge(merged, victim, torch.ones_like(victim, dtype=torch.bool))
    H, Hq = state.keys.shape[1], capture.get(layer, "query_post_rope").shape[1]
    G = Hq // H
    grab = lambda name: capture.get(layer, name)[row : row + 1].float()  # noqa: E731
    q = grab("query_post_rope")[:, :, t - 1 : t + future]  # (1, Hq, F+1, D)
    k = grab("key_post_rope")[:, :, : t + future].repeat_interleave(G, 1)  # (1, Hq, L, D)
    v = grab("value")[:, :, : t + future].repeat_interleave(G, 1)  # (1, Hq, L, Dv)
    L = k.shape[2]
    pos = torch.arange(L)
    spec = capture.attention(layer)  # the layer's scaling, soft-cap and window
    causal = visible(t - 1 + torch.arange(future + 1), pos, spec.window)[None, None].expand(1, Hq, -1, -1)
    o_full, scores = _attend(q, k, v, causal, spec)
    j = victim.repeat_interleave(G, 1)[..., None]  # (1, Hq, 1)
    n = neighbour.repeat_interleave(G, 1)[..., None]
    dropped = causal & (pos[None, None, None, :] != j[..., None])  # (1, Hq, Q, L): the victim's key is gone
    s0 = scores[:, :, 0]  # (1, Hq, L): the merging query's scores
    e_jn = (s0.gather(-1, j) - s0.gather(-1, n)).exp()[..., None]  # (1, Hq, 1, 1): e_j / e_n
    v_j, v_n = (v.gather(2, x[..., None].expand(-1, -1, 1, v.shape[-1])) for x in (j, n))  # (1, Hq, 1, Dv)
    w_j = e_jn / (1 + e_jn)
    candidates = {
        "ideal": e_jn * (v_j - o_full[:, :, :1]) + v_n,
        "convex_query": w_j * v_j + (1 - w_j) * v_n,
        "weightedkv": merged.values.float().gather(2, neighbour[..., None, None].expand(-1, -1, 1, v.shape[-1]))
        .repeat_interleave(G, 1),
        "evict": v_n,
    }
    out = {}
    for name, new in candidates.items():
        values = v.scatter(2, n[..., None].expand(-1, -1, 1, v.shape[-1]), new)
        o, _ = _attend(q, k, values, dropped, spec)
        out[name] = relative_error(o, o_full)[0]  # (Hq, F+1)
    return out


def ideal_sequence(capture, layers: list[int], steps: list[int], future: int, sinks: int = 4,
                   recent: int | None = None) -> dict[str, Tensor]:
    """One sequence: per variant (steps, L, H, 2): [error at the merging query, mean over the next F]."""
    out: dict[str, list] = {name: [] for name in VARIANTS}
    for t in steps:
        per_layer = {name: [] for name in VARIANTS}
        for layer in layers:
            H = capture.get(layer, "value").shape[1]
            for name, err in ideal_errors(capture, layer, t, future, sinks, recent).items():
                grouped = group_mean(err, H, dim=0)  # (Hq, F+1) -> (H, F+1): mean over the query group
                per_layer[name].append(torch.stack([grouped[:, 0], grouped[:, 1:].mean(-1)], -1))  # (H, 2)
        for name in VARIANTS:
            out[name].append(torch.stack(per_layer[name]))  # (L, H, 2)
    return {name: torch.stack(v) for name, v in out.items()}
