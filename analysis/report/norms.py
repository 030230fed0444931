"""Overview figures of a capture run."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.runtime.capture import Capture

NORM_KINDS = ("key_pre_rope", "key_post_rope", "value")


def norms_by_head(capture: Capture, kind: str) -> list[list[float]]:
    """Mean L2 norm of ``kind`` vectors per (layer, head), over sequences and tokens."""
    return [capture.get(layer, kind).float().norm(dim=-1).mean(dim=(0, 2)).tolist() for layer in capture.layers]


def fig_norms(capture: Capture, kinds=NORM_KINDS) -> go.Figure:
    """Layer x head heatmaps of mean vector norm, one panel per kind (pre/post-RoPE keys, values)."""
    kinds = [k for k in kinds if k in capture.kinds]
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=kinds, horizontal_spacing=0.08)
    for col, kind in enumerate(kinds, start=1):
        z = norms_by_head(capture, kind)
        fig.add_trace(go.Heatmap(z=z, y=capture.layers, x=list(range(len(z[0]))), colorscale="Viridis",
                                 coloraxis="coloraxis" if kind.startswith("key") else None,
                                 colorbar=dict(x=1.02) if not kind.startswith("key") else None,
                                 hovertemplate="layer %{y}, head %{x}: %{z:.2f}<extra></extra>"),
                      row=1, col=col)
        fig.update_xaxes(title_text="KV head", row=1, col=col)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=f"Mean L2 norm per token — {capture.meta.get('model', '')}",
                      coloraxis=dict(colorscale="Viridis", colorbar=dict(x=-0.2, title="keys")),
                      template="plotly_white", height=520, margin=dict(l=150))
    return fig
