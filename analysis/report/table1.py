"""The Table-I-style sweep over corpora (``analysis.perplexity.table1``): one panel per corpus, perplexity against m."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.compress import compresses
from analysis.report.perplexity import colour


def fig_table1(table: dict) -> go.Figure:
    """Perplexity per method at each budget, error bars = std over documents; full cache as a dashed line.

    Methods are drawn side by side around each budget (small x offsets) so their error bars do not overlap.
    """
    corpora, budgets = table["corpora"], table["budgets"]
    methods = [m for m in table["methods"] if compresses(m)]
    fig = make_subplots(rows=1, cols=len(corpora), subplot_titles=corpora, horizontal_spacing=0.05)
    for col, corpus in enumerate(corpora, start=1):
        entries = [e for e in table["entries"] if e["corpus"] == corpus]
        for i, method in enumerate(methods):
            mine = sorted((e for e in entries if e["method"] == method), key=lambda e: e["budget"])
            offset = 0.3 * (i - (len(methods) - 1) / 2) / max(len(methods) - 1, 1)
            fig.add_trace(go.Scatter(x=[budgets.index(e["budget"]) + offset for e in mine], y=[e["ppl"] for e in mine],
                                     name=method, mode="lines+markers", line_color=colour(method), legendgroup=method,
                                     showlegend=col == 1, customdata=[e["budget"] for e in mine],
                                     hovertemplate=f"{method}, m=%{{customdata}}: %{{y:.2f}}<extra>{corpus}</extra>",
                                     error_y=dict(type="data", array=[e["ppl_doc_std"] for e in mine], thickness=1,
                                                  width=3, visible=table["documents"] > 1)),
                          row=1, col=col)
        full = next((e for e in entries if not compresses(e["method"])), None)
        if full is not None:  # after the traces: plotly skips shapes on a subplot that is still empty
            fig.add_hline(y=full["ppl"], line_dash="dash", line_color="grey", row=1, col=col,
                          annotation_text=f"full cache {full['ppl']:.1f}", annotation_position="top left")
        fig.update_xaxes(tickvals=list(range(len(budgets))), ticktext=[f"m={b}" for b in budgets],
                         range=[-0.5, len(budgets) - 0.5], title_text="cache size", row=1, col=col)
    fig.update_yaxes(title_text="perplexity", row=1, col=1)
    spread = "error bars: std over documents" if table["documents"] > 1 else "one document per corpus (no spread)"
    fig.update_layout(template="plotly_white", width=max(900, 330 * len(corpora)), height=520,
                      title=f"Perplexity under a compressed cache, per corpus — {table['model']}<br><sup>"
                            f"{table['documents']} document(s) x {table['tokens']} tokens, window {table['window']}, "
                            f"stride {table['stride']}; {spread}</sup>",
                      legend=dict(orientation="h", y=-0.15))
    return fig
