"""The Table-I-style sweep over corpora (``analysis.table1``): one panel per corpus, perplexity against m."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.plots.perplexity import COLOURS


def fig_table1(table: dict) -> go.Figure:
    """Perplexity per method at each budget, error bars = std over documents; full cache as a dashed line."""
    corpora = table["corpora"]
    fig = make_subplots(rows=1, cols=len(corpora), subplot_titles=corpora, horizontal_spacing=0.05)
    for col, corpus in enumerate(corpora, start=1):
        entries = [e for e in table["entries"] if e["corpus"] == corpus]
        for method in table["methods"]:
            if method == "full":
                full = next((e for e in entries if e["method"] == "full"), None)
                if full is not None:
                    fig.add_hline(y=full["ppl"], line_dash="dash", line_color="grey", row=1, col=col,
                                  annotation_text=f"full {full['ppl']:.1f}", annotation_position="top left")
                continue
            mine = sorted((e for e in entries if e["method"] == method), key=lambda e: e["budget"])
            fig.add_trace(go.Scatter(x=[f"m={e['budget']}" for e in mine], y=[e["ppl"] for e in mine], name=method,
                                 mode="lines+markers", line_color=COLOURS[method], legendgroup=method,
                                 showlegend=col == 1,
                                 error_y=dict(type="data", array=[e["ppl_doc_std"] for e in mine],
                                              visible=table["documents"] > 1)),
                          row=1, col=col)
    fig.update_yaxes(title_text="perplexity", row=1, col=1)
    fig.update_xaxes(title_text="cache size")
    spread = "error bars: std over documents" if table["documents"] > 1 else "one document per corpus (no spread)"
    fig.update_layout(template="plotly_white", width=max(900, 330 * len(corpora)), height=520,
                      title=f"Perplexity under a compressed cache, per corpus — {table['model']}<br><sup>"
                            f"{table['documents']} document(s) x {table['tokens']} tokens, window {table['window']}, "
                            f"stride {table['stride']}; {spread}</sup>",
                      legend=dict(orientation="h", y=-0.12))
    return fig
