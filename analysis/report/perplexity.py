"""Figures and tables from a perplexity sweep (``perplexity.json``), shared by commands and dashboard."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative

from analysis.compress import METHODS, PRESETS, compresses, in_registry_order

COLOURS = dict(zip([*METHODS, *PRESETS], qualitative.Plotly + qualitative.D3))


def colour(method: str) -> str:
    """A method's colour in every figure; a custom merge point is grey."""
    return COLOURS.get(method, "#666666")


def table_rows(results: list[dict]) -> list[dict]:
    """Table-I layout: one row per method, one perplexity column per budget (``m=128`` ...).

    ``full`` keeps every token, so its one perplexity fills every budget column.
    """
    budgets = sorted({r["budget"] for r in results if compresses(r["method"])})
    rows = []
    for method in in_registry_order(r["method"] for r in results):
        ppl = {r["budget"]: round(r["ppl"], 3) for r in results if r["method"] == method}
        if ppl:
            fill = next(iter(ppl.values())) if not compresses(method) else ""
            rows.append({"method": method} | {f"m={b}": ppl.get(b, fill) for b in budgets})
    return rows


def fig_ppl_vs_budget(summary: dict) -> go.Figure:
    """Perplexity against cache size, one line per method; ``full`` as a dashed reference."""
    fig = go.Figure()
    for method in summary["methods"]:
        points = sorted((r["budget"], r["ppl"]) for r in summary["results"] if r["method"] == method)
        if not compresses(method):
            fig.add_hline(y=points[0][1], line_dash="dash", line_color="grey",
                          annotation_text=f"full cache {points[0][1]:.2f}")
            continue
        x, y = zip(*points)
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=method, line_color=colour(method)))
    fig.update_layout(title=f"Perplexity vs cache size — {summary['model']}, window {summary['window']}",
                      xaxis_title="cache size m (slots per layer and KV head)", yaxis_title="perplexity",
                      xaxis_type="log", template="plotly_white", width=900, height=520)
    return fig


def fig_running_log_ppl(summary: dict, methods=("weightedkv", "weightedkv_evict"),
                        budget: int | None = None) -> go.Figure:
    """Running mean log-perplexity against token position (the paper's Fig. 4 ablation)."""
    budgets = [r["budget"] for r in summary["results"] if compresses(r["method"])]
    budget = budget if budget is not None else (min(budgets) if budgets else None)
    fig = go.Figure()
    for r in summary["results"]:
        if r["method"] in methods and (r["budget"] == budget or not compresses(r["method"])):
            curve = r["running_log_ppl"]
            step = max(1, summary["tokens"] // max(len(curve), 1))
            fig.add_trace(go.Scatter(x=[step * (i + 1) for i in range(len(curve))], y=curve, mode="lines",
                                     name=f"{r['method']} (m={r['budget']})", line_color=colour(r["method"])))
    fig.update_layout(title=f"Running log-perplexity, m={budget} — mean over {summary['documents']} document(s)",
                      xaxis_title="token position", yaxis_title="mean log-perplexity so far",
                      template="plotly_white", width=900, height=520)
    return fig
