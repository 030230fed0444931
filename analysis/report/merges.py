"""Figures of the merge study (``merges.json``): the space as a heatmap, and the cascade."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots


def fig_space(result: dict, split: str | None = None) -> go.Figure:
    """Variant x (budget, corpus) heatmap; colour = mean paired perplexity difference to the variant's own eviction
    (blue: the merge is better), text = wins / cells."""
    rows = [r for r in result["rows"] if split is None or r.get("split") == split]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    columns = list(dict.fromkeys((r["budget"], r["corpus"]) for r in rows))
    find = {(r["variant"], r["budget"], r["corpus"]): r for r in rows}
    z, text = [], []
    for v in variants:
        cells = [find.get((v, b, c)) for b, c in columns]
        z.append([None if r is None or r["mean_diff"] is None else r["mean_diff"] for r in cells])
        text.append(["" if r is None else f"{r['wins']}/{r['cells']}" for r in cells])
    values = [abs(x) for row in z for x in row if x is not None]
    top = max(values) if values else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=[f"{c} m={b}" for b, c in columns], y=variants, text=text,
                               texttemplate="%{text}", colorscale="RdBu_r", zmid=0, zmin=-top, zmax=top,
                               colorbar={"title": "ppl − evict ppl"}))
    title = "Merge space: paired perplexity difference to each variant's own eviction"
    fig.update_layout(title=title + (f" ({split})" if split else ""), template="plotly_white",
                      width=max(700, 110 * len(columns) + 380), height=max(420, 26 * len(variants) + 160),
                      yaxis={"autorange": "reversed"}, margin={"l": 360})
    return fig


def fig_cascade(cascade: dict) -> go.Figure:
    """Left: running NLL gap to eviction along the stream, per variant. Right: merge-depth distribution."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("running mean NLL − eviction's (lower: merge better)",
                                                        "merge depth of held slots at the end"))
    step = max(1, cascade["tokens"] // max(1, len(next(iter(cascade["variants"].values()))["gap_curve"])))
    for i, (name, v) in enumerate(cascade["variants"].items()):
        c = qualitative.Plotly[i % len(qualitative.Plotly)]
        x = [step * (i + 1) for i in range(len(v["gap_curve"]))]
        fig.add_trace(go.Scatter(x=x, y=v["gap_curve"], mode="lines", name=name, line_color=c,
                                 legendgroup=name), row=1, col=1)
        total = sum(v["depth_histogram"].values()) or 1
        depth = {int(k): n / total for k, n in v["depth_histogram"].items()}
        fig.add_trace(go.Bar(x=list(depth), y=list(depth.values()), name=name, marker_color=c,
                             legendgroup=name, showlegend=False), row=1, col=2)
    fig.add_hline(y=0, line_dash="dash", line_color="grey", row=1, col=1)
    fig.update_xaxes(title_text="token position", row=1, col=1)
    fig.update_xaxes(title_text="tokens merged into the slot's value", row=1, col=2)
    fig.update_yaxes(title_text="share of held slots", type="log", row=1, col=2)
    fig.update_layout(title=f"Cascade over a {cascade['tokens']}-token stream, m={cascade['budget']}, "
                            f"{cascade['documents']} {cascade['corpus']} document(s)",
                      template="plotly_white", width=1200, height=500, barmode="group")
    return fig
