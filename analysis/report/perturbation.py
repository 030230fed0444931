"""Figures of a perturbation study (``perturbation.json``), shared by the command and the dashboard."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative

from analysis.compress import METHODS, compresses

COLOURS = dict(zip(list(METHODS) + ["ideal", "convex_query", "evict"], qualitative.Plotly + qualitative.D3))


LABELS = {"rel_error": "relative output error ||o - o_full|| / ||o_full||",
          "attn_cosine": "attention cosine (victim left out)",
          "attn_cosine_padded": "attention cosine (victim as 0)", "kl": "KL(full || compressed) [nats]",
          "delta_nll": "NLL change [nats]", "attn_deviation": "relative attention-block output deviation",
          "at_merge": "relative output error at the merging query", "future": "relative output error, next queries"}


def _rows(summary: dict, **match) -> list[dict]:
    return [r for r in summary["results"] if all(r.get(k) == v for k, v in match.items())]


def _band(fig: go.Figure, x, mean, std, name: str, colour: str) -> None:
    upper = [m + s for m, s in zip(mean, std)]
    lower = [m - s for m, s in zip(mean, std)]
    fig.add_trace(go.Scatter(x=list(x) + list(x)[::-1], y=upper + lower[::-1], fill="toself", line_width=0,
                             fillcolor=colour, opacity=0.2, showlegend=False, hoverinfo="skip", name=name))
    fig.add_trace(go.Scatter(x=list(x), y=mean, mode="lines", name=name, line_color=colour))


def fig_fig2(summary: dict, metric: str = "rel_error") -> go.Figure:
    """The paper's Fig. 2: per step after t0, mean ± std over sequences (layers and heads averaged), merge vs evict."""
    fig = go.Figure()
    for r in _rows(summary, metric=metric, layer=None):
        _band(fig, [summary["t0"] + s for s in r["steps"]], r["curve"], r["curve_std"], r["method"],
              COLOURS.get(r["method"], "grey"))
    fig.update_layout(title=f"One compression at step {summary['t0']}: {metric} of the next {summary['future']} "
                            f"queries — mean ± std over {summary['sequences']} sequences",
                      xaxis_title="query position", yaxis_title=LABELS.get(metric, metric), template="plotly_white",
                      width=900, height=500)
    return fig


def head_grid(summary: dict, metric: str, method: str, budget=None) -> tuple[list[int], list[int], list[list]]:
    """(layers, heads, z[layer][head]) of mean values for one method (and budget)."""
    rows = [r for r in _rows(summary, metric=metric, method=method, budget=budget)
            if r["layer"] is not None and r["kv_head"] is not None]
    layers = sorted({r["layer"] for r in rows})
    heads = sorted({r["kv_head"] for r in rows})
    z = [[None] * len(heads) for _ in layers]
    for r in rows:
        z[layers.index(r["layer"])][heads.index(r["kv_head"])] = r["mean"]
    return layers, heads, z


def fig_head_heatmap(summary: dict, method: str, budget=None, metric: str = "rel_error",
                     minus: str | None = None) -> go.Figure:
    """Layer x KV head heatmap of ``metric`` for ``method``; with ``minus``, the difference method - minus
    (blue: ``method`` perturbs less)."""
    layers, heads, z = head_grid(summary, metric, method, budget)
    title = f"{method}" + (f", m={budget}" if budget is not None else "")
    kwargs = {"colorscale": "Viridis"}
    if minus is not None:
        _, _, other = head_grid(summary, metric, minus, budget)
        z = [[a - b if a is not None and b is not None else None for a, b in zip(r1, r2)] for r1, r2 in zip(z, other)]
        title = f"{method} minus {minus}" + (f", m={budget}" if budget is not None else "")
        top = max((abs(v) for row in z for v in row if v is not None), default=1.0) or 1.0
        kwargs = {"colorscale": "RdBu_r", "zmid": 0, "zmin": -top, "zmax": top}
    fig = go.Figure(go.Heatmap(z=z, x=heads, y=layers,
                               hovertemplate="layer %{y}, KV head %{x}: %{z:.3g}<extra></extra>",
                               colorbar_title=metric, **kwargs))
    fig.update_layout(title=dict(text=f"{LABELS.get(metric, metric)}<br>{title}", font_size=13), xaxis_title="KV head",
                      yaxis_title="layer", template="plotly_white", width=520, height=700,
                      xaxis_type="category", yaxis_type="category")  # one row per measured layer, even if few
    return fig


def fig_positions(summary: dict, budget, metric: str = "kl", methods=None) -> go.Figure:
    """End to end: ``metric`` per position, mean ± std over sequences, one band per method at ``budget``."""
    fig = go.Figure()
    for r in _rows(summary, metric=metric, budget=budget, layer=None):
        if methods is None or r["method"] in methods:
            _band(fig, r["steps"], r["curve"], r["curve_std"], r["method"], COLOURS.get(r["method"], "grey"))
    fig.update_layout(title=f"{LABELS.get(metric, metric)} per position, m={budget} — mean ± std over "
                            f"{summary['sequences']} sequences", xaxis_title="position (prediction of the next token)",
                      yaxis_title=metric, template="plotly_white", width=900, height=500)
    return fig


def fig_layer_deviation(summary: dict, budget, methods=None) -> go.Figure:
    """End to end: mean ± std over sequences of each layer's attention-output deviation, per method."""
    fig = go.Figure()
    for method in summary["methods"]:
        rows = [r for r in _rows(summary, metric="attn_deviation", method=method, budget=budget)
                if r["layer"] is not None]
        if rows and (methods is None or method in methods):
            fig.add_trace(go.Scatter(x=[r["layer"] for r in rows], y=[r["mean"] for r in rows], name=method,
                                     error_y=dict(array=[r["std"] for r in rows]), mode="lines+markers",
                                     line_color=COLOURS.get(method, "grey")))
    fig.update_layout(title=f"Attention-block output deviation per layer, m={budget}", xaxis_title="layer",
                      yaxis_title=LABELS["attn_deviation"], yaxis_type="log", template="plotly_white",
                      width=900, height=500)
    return fig


def fig_ideal(summary: dict, layer=None) -> go.Figure:
    """Ideal merge vs its convex approximations vs eviction: error at the merging query and after it."""
    fig = go.Figure()
    for metric in ("at_merge", "future"):
        rows = [r for r in _rows(summary, metric=metric, layer=layer) if r["kv_head"] is None]
        fig.add_trace(go.Bar(x=[r["method"] for r in rows], y=[r["mean"] for r in rows], name=LABELS[metric],
                             error_y=dict(array=[r["std"] for r in rows])))
    where = "all layers" if layer is None else f"layer {layer}"
    fig.update_layout(title=f"Ideal merge (§III-B) vs convex merges vs eviction — {where}, mean ± std over sequences",
                      yaxis_title="relative output error", barmode="group", template="plotly_white",
                      width=900, height=500)
    return fig


def figures(summary: dict) -> dict[str, go.Figure]:
    """Every figure of a study, by file stem."""
    mode, out = summary["mode"], {}
    if mode == "fig2":
        for metric in ("rel_error", "attn_cosine", "attn_cosine_padded"):
            out[f"fig2_{metric}"] = fig_fig2(summary, metric)
        out["heads_merge_minus_evict"] = fig_head_heatmap(summary, "weightedkv", None, minus="weightedkv_evict")
    elif mode == "sweep":
        for budget in summary["budgets"]:
            for method in summary["methods"]:
                if compresses(method):
                    out[f"heads_{method}_m{budget}"] = fig_head_heatmap(summary, method, budget)
            if {"weightedkv", "weightedkv_evict"} <= set(summary["methods"]):
                out[f"heads_merge_minus_evict_m{budget}"] = fig_head_heatmap(summary, "weightedkv", budget,
                                                                             minus="weightedkv_evict")
    elif mode == "end2end":
        for budget in summary["budgets"]:
            out[f"kl_m{budget}"] = fig_positions(summary, budget, "kl")
            out[f"delta_nll_m{budget}"] = fig_positions(summary, budget, "delta_nll")
            out[f"layer_deviation_m{budget}"] = fig_layer_deviation(summary, budget)
    elif mode == "ideal":
        out["ideal"] = fig_ideal(summary)
    return out
