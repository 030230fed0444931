"""How much does ONE compression step perturb the attention of future queries? (WeightedKV Fig. 2)

From the uncompressed cache a compressed cache would hold after ``t`` tokens (``state_at``), each
method takes exactly one compression step with budget ``t - 1`` through its own ``Policy``
(``select`` / ``merge`` / ``LayerState.remove``: no method is re-implemented here). The captured
queries ``t .. t+future-1`` then attend over [compressed past + true keys/values of tokens t..s]
and over the full cache [tokens 0..s]; we report the relative L2 error of the attention output and
the cosine similarity of the attention weights.

The queries are the captured ones (teacher forcing at this layer): the perturbation is measured at
one layer, not propagated through later layers or generated tokens. Attention is the layer's own
(``Capture.attention``: scaling, soft-cap and window as the model applies them).

Attention-weight comparison (the paper does not say how it compares distributions of different
lengths): ``attn_cosine`` compares the compressed run's weights with the full run's weights
restricted to the surviving slots and renormalised. Since WeightedKV drops ``k_j`` and never touches
the surviving keys, this is 1 up to rounding for every method that only evicts keys; we therefore
also report ``attn_cosine_padded``: full-length weights, the compressed run holding 0 on the victim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.compress import LayerState, PolicyOptions
from analysis.errors import UserError
from analysis.jobs import Job, make_jobs
from analysis.ops import AttentionSpec, attention_logits, masked_softmax, query_groups, relative_error, visible
from analysis.runtime.capture import Capture

PAIR = ("weightedkv", "weightedkv_evict")  # same victim (same score): merge vs evict


METRICS = ("rel_error", "attn_cosine", "attn_cosine_padded")


def causal_attention(queries: Tensor, keys: Tensor, spec: AttentionSpec | None = None) -> Tensor:
    """Softmax(q k^T scaled, soft-capped) with a causal (or sliding-window) mask, as ``spec`` says (None:
    1/sqrt(d), full causal): (B, Hq, T, D) x (B, H, T, D) -> (B, Hq, T, T)."""
    B, Hq, T, _ = queries.shape
    H = keys.shape[1]
    q = query_groups(queries.float(), H)  # (B, H, G, T, D): GQA group of each KV head
    scores = attention_logits(q, keys.float()[:, :, None], spec)  # (B, H, G, T, T)
    pos = torch.arange(T, device=keys.device)
    causal = visible(pos, pos, spec.window if spec is not None else None)  # (T, T)
    return masked_softmax(scores, causal).reshape(B, Hq, T, T)


def state_at(capture: Capture, layer: int, t: int, row: int = 0) -> LayerState:
    """The uncompressed LayerState of sequence ``row`` after its first ``t`` tokens.

    Built exactly as ``CompressedCache`` builds it in a prefill: ``append`` the post-RoPE keys and
    values of tokens 0..t-1, then ``observe`` the causal attention of those t queries (the layer's own
    scaling, soft-cap and window, recomputed from the captured post-RoPE queries and keys).
    """
    keys = capture.get(layer, "key_post_rope")
    T = keys.shape[2]
    if not 1 <= t <= T:
        raise UserError(f"t={t} is outside the captured 1..{T} tokens")
    keys = keys[row : row + 1, :, :t]  # (1, H, t, D)
    values = capture.get(layer, "value")[row : row + 1, :, :t]  # (1, H, t, Dv)
    queries = capture.get(layer, "query_post_rope")[row : row + 1, :, :t]  # (1, Hq, t, D)
    state = LayerState.empty(keys, values)
    state.append(keys, values, torch.arange(t, device=keys.device))
    state.observe(causal_attention(queries, keys, capture.attention(layer)))
    return state


def _attend(q: Tensor, keys: Tensor, values: Tensor, positions: Tensor, t: int,
            spec: AttentionSpec | None = None) -> tuple[Tensor, Tensor]:
    """q (B, H, G, F, D) of positions t..t+F-1 over slots at ``positions`` (B, H, L): the past, then F future.

    Causal (a slot is visible iff its position <= the query's), within ``spec``'s window if any.
    Returns weights (B, H, G, F, L) and outputs (B, H, G, F, Dv), L = past + F, in float32.
    """
    F = q.shape[-2]
    query_pos = t + torch.arange(F, device=q.device)  # (F,)
    allowed = positions[:, :, None, :] <= query_pos[:, None]  # (B, H, F, L)
    if spec is not None and spec.window is not None:
        allowed = allowed & (positions[:, :, None, :] > query_pos[:, None] - spec.window)
    scores = attention_logits(q.float(), keys.float()[:, :, None], spec)  # (B, H, G, F, L)
    weights = masked_softmax(scores, allowed[:, :, None])
    return weights, weights @ values.float()[:, :, None]  # (B, H, G, F, Dv)


def _summary(values: Tensor) -> dict:
    """values (B, Hq, F): per-step list (mean over rows and query heads), mean and std over all."""
    return {"per_step": values.mean(dim=(0, 1)).tolist(), "mean": values.mean().item(),
            "std": values.std(unbiased=False).item()}


def pair_jobs(t: int, sinks: int = 4, recent: int | None = None, methods=PAIR) -> list[Job]:
    """The jobs of one compression step at token ``t`` (budget t - 1): WeightedKV and its eviction by default."""
    return make_jobs(list(methods), [t - 1], PolicyOptions(sinks, recent))


def perturb_state(state: LayerState, queries: Tensor, keys: Tensor, values: Tensor, jobs: list[Job],
                  spec: AttentionSpec | None = None) -> dict:
    """One compression step of each job's method on ``state`` (t slots, so at budget t - 1), scored on F
    future queries.

    queries (B, Hq, F, D): the queries of tokens t..t+F-1; keys/values (B, H, F, D): their true
    keys/values. ``state`` must be uncompressed (the full reference is ``state`` + the future).
    ``spec``: the layer's scaling, soft-cap and window (None: 1/sqrt(D), full causal).
    Returns ``{method: {"victim": (B, H), "rel_error" | "attn_cosine" | "attn_cosine_padded":
    (B, Hq, F)}}`` tensors.
    """
    B, Hq, F, D = queries.shape
    H, t = state.keys.shape[1], state.capacity
    q = query_groups(queries, H)  # (B, H, G, F, D): query head h uses KV head h // G
    future = (t + torch.arange(F, device=keys.device)).expand(B, H, F)  # (B, H, F): positions t..t+F-1
    w_full, o_full = _attend(q, torch.cat([state.keys, keys], 2), torch.cat([state.values, values], 2),
                             torch.cat([state.positions, future], 2), t, spec)
    out, victims = {}, {}
    for job in jobs:
        method, policy = job.method, job.at_budget(t - 1).policy
        small = state.clone()  # merges write into values in place
        victim = policy.select(small)  # (B, H): the single slot this method gives up
        everywhere = torch.ones_like(victim, dtype=torch.bool)
        policy.merge(small, victim, everywhere)
        small.remove(victim, everywhere)
        small = small.ordered()  # the t - 1 surviving slots, oldest first
        victims[method] = victim
        w, o = _attend(q, torch.cat([small.keys, keys], 2), torch.cat([small.values, values], 2),
                       torch.cat([small.positions, future], 2), t, spec)
        err = relative_error(o, o_full)  # (B, H, G, F)
        # surviving past slots' indices in the full cache (positions are sorted), then the future
        idx = torch.searchsorted(state.positions, small.positions)  # (B, H, t-1)
        idx = torch.cat([idx, (t + torch.arange(F, device=idx.device)).expand(B, H, F)], 2)  # (B, H, L')
        kept = w_full.gather(-1, idx[:, :, None, None].expand(*w.shape))  # (B, H, G, F, L')
        dot = (kept * w).sum(-1)
        cos = dot / (kept.norm(dim=-1) * w.norm(dim=-1))  # renormalising `kept` does not change it
        padded = dot / (w_full.norm(dim=-1) * w.norm(dim=-1))  # victim slot = 0 in the compressed run
        out[method] = {"victim": victim, "rel_error": err.reshape(B, Hq, F),
                       "attn_cosine": cos.reshape(B, Hq, F), "attn_cosine_padded": padded.reshape(B, Hq, F)}
    if all(m in victims for m in PAIR):  # the comparison only isolates merge vs evict if this holds
        assert torch.equal(victims[PAIR[0]], victims[PAIR[1]]), "WeightedKV and its eviction differ in victim"
    return out


def _run(capture, layer, t, future, row, jobs: list[Job]) -> dict:
    T = capture.get(layer, "key_post_rope").shape[2]
    if t < 2 or future < 1 or t + future > T:
        raise UserError(f"need 2 <= t and t + future <= {T} captured tokens (got t={t}, future={future})")
    fut = slice(t, t + future)
    return perturb_state(
        state_at(capture, layer, t, row),
        capture.get(layer, "query_post_rope")[row : row + 1, :, fut],  # (1, Hq, F, D)
        capture.get(layer, "key_post_rope")[row : row + 1, :, fut],  # (1, H, F, D)
        capture.get(layer, "value")[row : row + 1, :, fut],  # (1, H, F, Dv)
        jobs, capture.attention(layer))


def perturb(capture: Capture, layer: int, t: int, jobs: list[Job] | None = None, future: int = 64,
            row: int = 0) -> dict:
    """One compression step at token ``t`` of sequence ``row``, then ``future`` captured queries.

    Each job (default ``pair_jobs(t)``) compresses ``state_at(t)`` at budget t - 1, i.e.
    gives up exactly the one slot it would evict. WeightedKV and ``weightedkv_evict`` share the
    score ā = a / n, so they pick the same victim (asserted): the difference between them is
    purely merging v_j into v_{j+1} versus dropping it. Per method: ``rel_error`` = ||o - o_full|| /
    ||o_full|| and the attention cosines (module docstring), each as ``per_step`` (list over
    future steps, mean over query heads), ``mean`` and ``std`` (over query heads x steps).
    """
    if jobs is not None and not all(isinstance(job, Job) for job in jobs):
        raise UserError("give configured jobs (one_step.pair_jobs(t, methods=...)), not method names")
    result = _run(capture, layer, t, future, row, jobs or pair_jobs(t))
    return {m: {"victim": r["victim"][0].tolist(), "head_error": _head_mean(r)[0].tolist()}
            | {k: _summary(r[k]) for k in METRICS} for m, r in result.items()}


def _head_mean(result: dict) -> Tensor:
    """Relative error (B, Hq, F) -> (B, H): mean over the future steps and each KV head's group."""
    H = result["victim"].shape[1]
    return query_groups(result["rel_error"], H).flatten(2).mean(-1)  # (B, H, G, F) -> (B, H, G*F) -> (B, H)
