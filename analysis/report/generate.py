"""Figures of a compressed cache after ``generate()`` (dashboard Generate page): plain data in, go.Figure out."""

from __future__ import annotations

import plotly.graph_objects as go


def fig_occupancy(occupancy: dict[str, list[int]], budget: int | None = None) -> go.Figure:
    """Slots held per layer, one bar group per run (e.g. ``{"weightedkv": [...], "full": [...]}``)."""
    fig = go.Figure()
    for name, slots in occupancy.items():
        fig.add_trace(go.Bar(x=list(range(len(slots))), y=slots, name=name))
    if budget is not None:
        fig.add_hline(y=budget, line_dash="dash", line_color="grey", annotation_text=f"budget {budget}")
    fig.update_layout(title="Cache occupancy per layer after generation", xaxis_title="layer",
                      yaxis_title="slots held (per KV head)", barmode="group", template="plotly_white", height=380)
    return fig


def fig_kept_positions(kept: list[list[int]], seen: int, layer: int, sinks: int = 0, recent: int | None = None,
                       prompt_tokens: int | None = None, heads: list[int] | None = None) -> go.Figure:
    """Original positions each KV head of ``layer`` still holds, as a strip per head.

    ``kept[h]`` are head h's positions, ``seen`` the tokens the layer was given (positions 0..seen-1);
    the protected sinks and recent window are shaded, the end of the prompt marked.
    """
    heads = list(range(len(kept))) if heads is None else heads
    fig = go.Figure()
    for h in heads:
        fig.add_trace(go.Scatter(x=kept[h], y=[f"head {h}"] * len(kept[h]), mode="markers", name=f"head {h}",
                                 marker=dict(symbol="line-ns-open", size=14, line_width=2)))
    if sinks:
        fig.add_vrect(x0=-0.5, x1=min(sinks, seen) - 0.5, fillcolor="orange", opacity=0.2, line_width=0,
                      annotation_text="sinks", annotation_position="top left")
    if recent:
        fig.add_vrect(x0=max(seen - recent, 0) - 0.5, x1=seen - 0.5, fillcolor="green", opacity=0.15, line_width=0,
                      annotation_text="recent", annotation_position="top right")
    if prompt_tokens is not None and prompt_tokens < seen:
        fig.add_vline(x=prompt_tokens - 0.5, line_dash="dot", line_color="grey", annotation_text="end of prompt",
                      annotation_position="bottom left")
    held = len(kept[heads[0]]) if heads else 0
    fig.update_layout(title=f"Layer {layer}: {held} of {seen} positions kept", xaxis_title="original token position",
                      xaxis_range=[-1, seen], yaxis_title="KV head", showlegend=False, template="plotly_white",
                      height=160 + 40 * len(heads))
    return fig
