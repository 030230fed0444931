"""Figures and tables of head profiles, plans and their evaluation, shared by the command and the page."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative

from analysis.heads.profile import grid


def table_rows(profile: dict, digits: int = 4) -> list[dict]:
    """The profile as sortable table rows (sensitivity rank first), numbers rounded for display."""
    rows = sorted(profile["rows"], key=lambda r: r["rank"])
    return [{k: (round(v, digits) if isinstance(v, float) else v) for k, v in r.items()} for r in rows]


def fig_scatter(profile: dict, x: str = "key_post_rope_rank90", y: str = "sensitivity",
                colour: str = "merge_minus_evict") -> go.Figure:
    """One point per head: ``x`` against ``y``, coloured by ``colour`` (diverging around 0)."""
    for m in (x, y, colour):
        grid(profile, m)  # unknown measure: one-line error
    rows = profile["rows"]
    c = [r[colour] for r in rows]
    span = max(abs(v) for v in c) or 1.0
    fig = go.Figure(go.Scatter(
        x=[r[x] for r in rows], y=[r[y] for r in rows], mode="markers",
        marker=dict(color=c, colorscale="RdBu_r", cmin=-span, cmax=span, size=9, colorbar=dict(title=colour)),
        text=[f"layer {r['layer']}, KV head {r['kv_head']} (rank {r['rank']})" for r in rows],
        hovertemplate="%{text}<br>" + x + " %{x:.3g}<br>" + y + " %{y:.3g}<extra></extra>"))
    fig.update_layout(title=f"{y} vs {x} — {profile.get('model')} (colour: {colour}; blue = merging helps)",
                      xaxis_title=x, yaxis_title=y, template="plotly_white", width=900, height=560)
    return fig


def _heatmap(z, title: str, colourbar: str, layers, diverging: bool = False) -> go.Figure:
    heads = len(z[0])
    kw = {}
    if diverging:
        span = max(abs(v) for row in z for v in row if v == v) or 1.0
        kw = dict(colorscale="RdBu_r", zmin=-span, zmax=span)
    fig = go.Figure(go.Heatmap(z=z, x=[f"H{h}" for h in range(heads)], y=list(layers), colorbar=dict(title=colourbar),
                               hovertemplate="layer %{y}, %{x}: %{z:.4g}<extra></extra>", **kw))
    fig.update_layout(title=title, xaxis_title="KV head", yaxis_title="layer", yaxis_autorange="reversed",
                      template="plotly_white", width=520, height=760)
    return fig


def fig_heatmap(profile: dict, measure: str) -> go.Figure:
    """Layer x KV head heatmap of any profile measure."""
    return _heatmap(grid(profile, measure), f"{measure} per head", measure, profile["layers"],
                    diverging=measure == "merge_minus_evict")


def fig_plan_heatmap(plan) -> go.Figure:
    """Layer x KV head heatmap of a plan's budgets; hatched text marks heads that evict instead of merging."""
    fig = _heatmap(plan.budgets, f"plan {plan.name}: {plan.total_slots} slots", "budget", range(plan.num_layers))
    if plan.merge is not None:
        fig.data[0].text = [["merge" if m else "evict" for m in row] for row in plan.merge]
        fig.data[0].texttemplate = "%{z}<br>%{text}"
    return fig


def fig_evaluation(summary: dict) -> go.Figure:
    """Perplexity per plan and corpus: bars for the whole text, dots for each document."""
    fig = go.Figure()
    corpora = list(dict.fromkeys(r["corpus"] for r in summary["results"]))
    plans = list(dict.fromkeys(r["plan"] for r in summary["results"]))
    for i, name in enumerate(plans):
        rows = [next(r for r in summary["results"] if r["plan"] == name and r["corpus"] == c) for c in corpora]
        colour = qualitative.Plotly[i % len(qualitative.Plotly)]
        fig.add_trace(go.Bar(x=corpora, y=[r["ppl"] for r in rows], name=name, marker_color=colour, offsetgroup=name))
        xs = [c for c, r in zip(corpora, rows) for _ in r["per_document_ppl"]]
        ys = [v for r in rows for v in r["per_document_ppl"].values()]
        docs = [d for r in rows for d in r["per_document_ppl"]]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", marker=dict(color="black", size=6), text=docs,
                                 showlegend=False, offsetgroup=name, hovertemplate="%{text}: %{y:.3f}<extra></extra>"))
    fig.update_layout(barmode="group", scattermode="group",
                      title=f"Perplexity at equal cache memory — plan {summary['plan']}",
                      yaxis_title="perplexity (dots: per document)", template="plotly_white", width=900, height=520)
    return fig


def profile_figures(profile: dict) -> dict[str, go.Figure]:
    """The figures a profile run writes: rank vs sensitivity, and heatmaps of three measures."""
    figs = {"scatter_rank_sensitivity": fig_scatter(profile)}
    for measure in ("sensitivity", "merge_minus_evict", "key_post_rope_rank90"):
        figs[f"heatmap_{measure}"] = fig_heatmap(profile, measure)
    return figs
