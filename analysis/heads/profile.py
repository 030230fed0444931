"""Head profiles: which (layer, KV head) can be squeezed, which must keep its cache, where merging helps.

Every measure is taken on one capture of *profiling* text (post-RoPE queries/keys, pre-RoPE keys,
values), one row per (layer, KV head):

- ``error_{method}_{budget}``: the teacher-forced relative attention-output error
  ||o - o_full|| / ||o_full|| of the head when its layer's captured queries, keys and values are
  replayed token by token through a ``LayerState`` held to ``budget`` slots by ``method`` (mean over
  the steps after the cache first fills, the head's query group and the sequences);
- ``merge_minus_evict``: mean over the budgets of error(weightedkv) - error(weightedkv_evict);
  negative means merging the victim's value beats evicting it for this head;
- ``key_pre_rope_rank90``, ``key_post_rope_rank90``, ``value_rank90``: rank at 90 % energy
  (``rank_90_mean`` of ``analysis.spectra``: per-sequence ranks averaged over sequences);
- ``entropy``: attention entropy in nats; ``sink_share`` / ``recent_share`` / ``middle_share``: the
  attention on the first ``sinks`` tokens, on the last ``recent_window`` tokens (the query's own
  included, sinks excluded) and on everything between; ``distance``: mean attention distance
  sum_j p_j (t - j) in tokens. All are means over queries t >= ``from_query`` (so that the three
  regions exist) and over the KV head's query group and the sequences.
- ``sensitivity``: the mean over log2(budget) of the head's error under its better method
  (min(weightedkv, weightedkv_evict) at each measured budget), i.e. the area under the
  error-versus-log-budget curve divided by its width (trapezoids). A head with high sensitivity
  loses much attention fidelity whatever its budget; ``rank`` 1 is the most sensitive head.

Attention statistics are computed layer by layer and sequence by sequence, never T x T for all
layers at once. Every recomputation uses the layer's own attention (``Capture.attention``: Gemma's
``query_pre_attn_scalar``, soft-capping, windows). Sliding-window layers (Gemma 2/3) are not
profiled: ``CompressedCache`` leaves them to the model's own sliding cache, so no budget applies
there; the profile lists them as ``sliding_layers``.
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import Tensor

from analysis.compress import MERGE_VS_EVICT, PolicyOptions, compresses, method_names
from analysis.errors import UserError
from analysis.jobs.job import make_jobs
from analysis.models.loading import LoadedModel, compressed_layers
from analysis.ops import AttentionSpec, attention_logits, masked_softmax, query_groups
from analysis.perturbation.teacher_forced import teacher_forced_capture
from analysis.runtime.capture import capture_sequences
from analysis.spectra.compute import compute_spectra

MERGE, EVICT = MERGE_VS_EVICT


DEFAULT_METHODS = (MERGE, EVICT)


DEFAULT_BUDGETS = (32, 64, 128, 256)


SPECTRA_COLUMNS = {"key_pre_rope": "key_pre_rope_rank90", "key_post_rope": "key_post_rope_rank90",
                   "value": "value_rank90"}


ATTENTION_COLUMNS = ("entropy", "sink_share", "recent_share", "middle_share", "distance")


def error_column(method: str, budget: int) -> str:
    return f"error_{method}_{budget}"


def check_methods(methods) -> list[str]:

    methods = list(methods)
    for m in methods:
        if not compresses(m):  # unknown names fail here with the list of valid ones
            raise UserError(f"method {m!r} keeps everything: a head profile needs a compressing method, e.g. "
                            f"{', '.join(method_names(compressing=True))}")
    return methods


# The same teacher-forced engine as the perturbation command's "sweep" mode (analysis.perturbation.teacher_forced).
def head_errors(capture, methods, budgets, sinks: int = 4, layers=None, progress=None) -> dict[tuple[str, int], Tensor]:
    """{(method, budget): (num_layers, num_kv_heads) mean teacher-forced relative output error}.

    Rows follow ``layers`` (default: the captured layers, in order). The error of a job is averaged
    over the steps from the one where its cache first fills, then over the sequences.
    """

    methods = check_methods(methods)
    T = capture.get(capture.layers[0], "key_post_rope").shape[2]
    for b in budgets:
        if not sinks < b < T:
            raise UserError(f"profile budget {b} must be above the {sinks} sinks and below the {T} profiled tokens")
    jobs = make_jobs(methods, [int(b) for b in budgets], PolicyOptions(sinks=sinks))
    layers = capture.layers if layers is None else list(layers)
    per_layer = teacher_forced_capture(capture, jobs, layers=layers, progress=progress)
    out = {}
    for j, job in enumerate(jobs):
        out[job.method, job.budget] = torch.stack([per_layer[l].mean_after_fill()[j].mean(0) for l in layers])  # (L, H)
    return out


@torch.inference_mode()
def attention_stats(queries: Tensor, keys: Tensor, sinks: int = 4, recent_window: int = 60,
                    from_query: int | None = None, spec: AttentionSpec | None = None) -> dict[str, Tensor]:
    """Per KV head (H,) statistics of causal attention. queries (B, Hq, T, D), keys (B, H, T, D) post-RoPE;
    ``spec``: the layer's scaling, soft-cap and window, as the model attends (None: 1/sqrt(D), full causal)."""
    B, Hq, T, D = queries.shape
    H = keys.shape[1]
    start = sinks + recent_window if from_query is None else from_query
    if not 0 <= start < T:
        raise UserError(f"attention statistics need queries from t={start} on, but only {T} tokens were profiled")
    t = torch.arange(start, T)  # the query positions averaged over
    j = torch.arange(T)
    dist = (t[:, None] - j[None, :]).float()  # (Q, T); negative = future (weight 0)
    sink = (j < sinks)[None, :].expand(len(t), T)
    recent = (dist < recent_window) & (dist >= 0) & ~sink
    totals = {k: torch.zeros(H, dtype=torch.float64) for k in ATTENTION_COLUMNS}
    for b in range(B):  # one sequence at a time: (Hq, Q, T) floats
        q = query_groups(queries[b, :, start:].float(), H, dim=0)  # (H, G, Q, D): group of KV head h
        scores = attention_logits(q, keys[b].float()[:, None], spec)  # (H, G, Q, T)
        seen = (dist >= 0) if spec is None or spec.window is None else (dist >= 0) & (dist < spec.window)
        p = masked_softmax(scores, seen)  # (H, G, Q, T): no weight on the future (nor outside a window)
        logp = torch.where(p > 0, p.log(), torch.zeros_like(p))
        per = {"entropy": -(p * logp).sum(-1), "sink_share": (p * sink).sum(-1),
               "recent_share": (p * recent).sum(-1), "distance": (p * dist.clamp_min(0)).sum(-1)}
        per["middle_share"] = 1 - per["sink_share"] - per["recent_share"]
        for k, v in per.items():  # (H, G, Q) -> (H,)
            totals[k] += v.double().mean((1, 2))
    return {k: (v / B).float() for k, v in totals.items()}


def sensitivity(curves: dict[int, Tensor]) -> Tensor:
    """Mean over log2(budget) of the error (trapezoids); ``curves`` {budget: (...)}; one budget: its error."""
    bs = sorted(curves)
    if len(bs) == 1:
        return curves[bs[0]].clone()
    x = [math.log2(b) for b in bs]
    area = sum((x[i + 1] - x[i]) * (curves[bs[i]] + curves[bs[i + 1]]) / 2 for i in range(len(bs) - 1))
    return area / (x[-1] - x[0])


def profile_capture(capture, methods=DEFAULT_METHODS, budgets=DEFAULT_BUDGETS, sinks: int = 4,
                    recent_window: int = 60, layers=None, progress=None) -> dict:
    """The head profile of ``capture``: ``{"rows": [...], "columns": [...], ...}`` (module docstring).

    ``methods`` must include weightedkv and weightedkv_evict (merge-minus-evict and sensitivity).
    ``progress(n)`` is called once per layer of the sweep and once per layer of attention statistics.
    """

    methods = check_methods(methods)
    for m in DEFAULT_METHODS:
        if m not in methods:
            raise UserError(f"a head profile needs method {m!r} (merge-minus-evict compares {MERGE} and {EVICT})")
    budgets = sorted({int(b) for b in budgets})
    sliding = [int(l) for l in capture.meta.get("sliding_layers", [])]
    if layers is None:
        layers = [l for l in capture.layers if l not in sliding]
    elif any(l in sliding for l in layers):
        raise UserError(f"layer(s) {[l for l in layers if l in sliding]} use a sliding window, which CompressedCache "
                        "does not compress: a head profile covers the other layers")
    layers = list(layers)
    errors = head_errors(capture, methods, budgets, sinks, layers, progress)
    spectra = compute_spectra(capture, kinds=tuple(SPECTRA_COLUMNS), layers=layers)
    ranks = {kind: spectra.matrix(kind, "rank_90_mean") for kind in SPECTRA_COLUMNS}  # rows follow layers
    stats = []
    for layer in layers:
        stats.append(attention_stats(capture.get(layer, "query_post_rope"), capture.get(layer, "key_post_rope"),
                                     sinks, recent_window, spec=capture.attention(layer)))
        if progress is not None:
            progress(1)
    best = {b: torch.minimum(errors[MERGE, b], errors[EVICT, b]) for b in budgets}  # (L, H)
    sens = sensitivity(best)
    mme = torch.stack([errors[MERGE, b] - errors[EVICT, b] for b in budgets]).mean(0)
    H = sens.shape[1]
    order = sorted(((i, h) for i in range(len(layers)) for h in range(H)), key=lambda ih: -float(sens[ih]))
    rank = {ih: n + 1 for n, ih in enumerate(order)}
    rows = []
    for i, layer in enumerate(layers):
        for h in range(H):
            row = {"layer": int(layer), "kv_head": h, "rank": rank[i, h], "sensitivity": float(sens[i, h]),
                   "merge_minus_evict": float(mme[i, h])}
            row |= {col: float(ranks[kind][i][h]) for kind, col in SPECTRA_COLUMNS.items()}
            row |= {k: float(stats[i][k][h]) for k in ATTENTION_COLUMNS}
            row |= {error_column(m, b): float(errors[m, b][i, h]) for m in methods for b in budgets}
            rows.append(row)
    T = capture.get(layers[0], "key_post_rope").shape[2]
    return {"model": capture.meta.get("model"),
            "num_layers": capture.meta.get("config", {}).get("num_layers", len(layers)),
            "layers": [int(l) for l in layers], "sliding_layers": sliding,
            "sliding_window": next((capture.attention(l).window for l in sliding if l in capture.layers), None),
            "num_kv_heads": H, "tokens": T,
            "sequences": capture.get(layers[0], "key_post_rope").shape[0],
            "text_ids": list(capture.meta.get("text_ids", [])),
            "methods": methods, "budgets": budgets, "sinks": sinks, "recent_window": recent_window,
            "columns": list(rows[0]), "rows": rows}


def measures(profile: dict) -> list[str]:
    """The numeric columns a figure can show (everything but the head's coordinates)."""
    return [c for c in profile["columns"] if c not in ("layer", "kv_head")]


def grid(profile: dict, measure: str) -> list[list[float]]:
    """``measure`` as a layers x KV heads grid; unknown measure: one-line error naming the choices."""
    if measure not in measures(profile):
        raise UserError(f"unknown measure {measure!r}: choose from {', '.join(measures(profile))}")
    row_of = {l: i for i, l in enumerate(profile["layers"])}
    out = [[float("nan")] * profile["num_kv_heads"] for _ in profile["layers"]]
    for r in profile["rows"]:
        out[row_of[r["layer"]]][r["kv_head"]] = r[measure]
    return out


def curves(profile: dict, method: str) -> dict[int, list[list[float]]]:
    """{budget: layers x heads grid of the teacher-forced error} of ``method``."""
    if method not in profile["methods"]:
        raise UserError(f"unknown method {method!r} for this profile: it has {', '.join(profile['methods'])}")
    return {b: grid(profile, error_column(method, b)) for b in profile["budgets"]}


def profile_sequences(loaded: LoadedModel, sequences, source: dict, methods=DEFAULT_METHODS, budgets=DEFAULT_BUDGETS,
                      sinks: int = 4, recent_window: int = 60, skip: int = 0, capture_progress: bool = False,
                      progress=None) -> dict:
    """Capture ``sequences`` with ``loaded`` and profile them: what the command, the figure and the starter
    write as profile.json (``profile_capture`` plus the model, the text source and ``summary``)."""

    config = loaded.model.config
    capture = capture_sequences(loaded, sequences, layers=compressed_layers(config), progress=capture_progress)
    result = profile_capture(capture, methods, budgets, sinks, recent_window, progress=progress)
    if result["sliding_layers"]:  # not captured: the window from the config
        result["sliding_window"] = getattr(config.get_text_config(), "sliding_window", None)
    return result | {"model": loaded.model_id, "source": source, "skip": skip, "summary": profile_summary(result)}


def profile_summary(profile: dict) -> dict:
    """The profile's headline numbers: per budget the mean error of merge and evict over heads and the
    heads where merging is lower; the heads with merge-minus-evict < 0 and its range; and the Pearson
    correlation of ``sensitivity`` with every other measure over heads."""

    rows = profile["rows"]
    per_budget = {}
    for b in profile["budgets"]:
        merge, evict = ([r[error_column(m, b)] for r in rows] for m in (MERGE, EVICT))
        per_budget[str(b)] = {"mean_error_merge": statistics.fmean(merge), "mean_error_evict": statistics.fmean(evict),
                              "heads_merge_lower": sum(a < e for a, e in zip(merge, evict))}
    mme = [r["merge_minus_evict"] for r in rows]
    sens = [r["sensitivity"] for r in rows]
    correlation = {}
    for c in profile["columns"]:
        if c in ("layer", "kv_head", "rank", "sensitivity") or c.startswith("error_"):
            continue
        values = [r[c] for r in rows]
        correlation[c] = statistics.correlation(values, sens) if len(set(values)) > 1 and len(set(sens)) > 1 else None
    return {"heads": len(rows), "per_budget": per_budget, "heads_merge_better": sum(x < 0 for x in mme),
            "merge_minus_evict_min": min(mme), "merge_minus_evict_max": max(mme),
            "correlation_with_sensitivity": correlation}


def summary_lines(summary: dict) -> list[str]:
    """The summary as the profile command prints it."""
    lines = [f"m={b}: mean error merge {v['mean_error_merge']:.3f} / evict {v['mean_error_evict']:.3f}; merge lower "
             f"in {v['heads_merge_lower']} of {summary['heads']} heads" for b, v in summary["per_budget"].items()]
    lines.append(f"merge-minus-evict < 0 (mean over budgets) in {summary['heads_merge_better']} of {summary['heads']} "
                 f"heads; range {summary['merge_minus_evict_min']:.3f} .. {summary['merge_minus_evict_max']:.3f}")
    corr = summary["correlation_with_sensitivity"]
    lines.append("correlation with sensitivity: " + ", ".join(
        f"{c} {v:+.2f}" for c, v in sorted(corr.items(), key=lambda cv: -abs(cv[1] or 0)) if v is not None))
    return lines
