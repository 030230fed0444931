"""Fig. 4 over one long stream (``analysis.perplexity.stream``): running log-perplexity, mean ± spread over
documents."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import hex_to_rgb, qualitative
from plotly.subplots import make_subplots

from analysis.compress import METHODS, compresses

COLOURS = dict(zip(METHODS, qualitative.Plotly))


DASHES = ["solid", "dash", "dot", "dashdot"]


def _rgba(colour: str, alpha: float) -> str:
    r, g, b = hex_to_rgb(colour)
    return f"rgba({r},{g},{b},{alpha})"


def _reference(summary: dict, budget: int) -> dict | None:
    """The curve the lower panel subtracts: WeightedKV at the same budget, else the first result."""
    for r in summary["results"]:
        if r["method"] == "weightedkv" and r["budget"] == budget:
            return r
    return None


def fig_stream_running(summary: dict) -> go.Figure:
    """Top: one line per (method, budget), the mean over documents of the running mean NLL, band = ± spread.
    Bottom: each method's running log-perplexity minus WeightedKV's at the same budget (> 0: worse)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
    low, high = float("inf"), float("-inf")
    budgets = sorted({r["budget"] for r in summary["results"] if compresses(r["method"])})
    for r in summary["results"]:
        curve = r["running_log_ppl"]
        x, mean, spread = curve["token"], curve["mean"], curve["spread"]
        colour = COLOURS.get(r["method"], "#444444")
        dash = "dash" if not compresses(r["method"]) else DASHES[budgets.index(r["budget"]) % len(DASHES)]
        name = "full cache" if not compresses(r["method"]) else f"{r['method']} (m={r['budget']})"
        name += f" — ppl {r['ppl']:.2f}"
        if summary["documents"] > 1:
            upper = [m + s for m, s in zip(mean, spread)]
            lower = [m - s for m, s in zip(mean, spread)]
            fig.add_trace(go.Scatter(x=x + x[::-1], y=upper + lower[::-1], fill="toself", line_width=0,
                                     fillcolor=_rgba(colour, 0.15), hoverinfo="skip", showlegend=False,
                                     legendgroup=name), row=1, col=1)
        else:
            upper = lower = mean
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=name, legendgroup=name,
                                 line=dict(color=colour, dash=dash)), row=1, col=1)
        settled = [i for i, t in enumerate(x) if t >= max(16, x[-1] // 16)] or list(range(len(x)))
        low = min(low, *(lower[i] for i in settled))
        high = max(high, *(upper[i] for i in settled))
        ref = _reference(summary, r["budget"] if compresses(r["method"]) or not budgets else budgets[0])
        if ref is not None and ref is not r:
            gap = [a - b for a, b in zip(mean, ref["running_log_ppl"]["mean"])]
            fig.add_trace(go.Scatter(x=x, y=gap, mode="lines", showlegend=False, legendgroup=name, name=name,
                                     line=dict(color=colour, dash=dash)), row=2, col=1)
    pad = 0.05 * (high - low) if high > low else 0.1
    fig.update_yaxes(range=[low - pad, high + pad], title_text="mean NLL of tokens 1..t", row=1, col=1)
    fig.add_hline(y=0, line_color="grey", line_width=1, row=2, col=1)
    fig.update_yaxes(title_text="minus weightedkv (same m)", row=2, col=1)
    fig.update_xaxes(title_text="token position t", row=2, col=1)
    docs = summary["documents"]
    band = f"band: ± 1 std across {docs} documents" if docs > 1 else "one document (no spread)"
    fig.update_layout(
        title=f"Running log-perplexity over one {summary['tokens']}-token stream, decoded token by token "
              f"(not restarted)<br><sup>{summary['model']}, {summary['source'].get('corpus') or 'text'}; "
              f"mean over {docs} document(s); {band}</sup>",
        template="plotly_white", width=1000, height=700, legend=dict(x=0.99, xanchor="right", y=0.99))
    return fig
