"""Figures of one head's attention and of a replayed compressed cache (dashboard Attention page)."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from analysis.runtime.replay import Replay


def _labels(tokens: list[str] | None, n: int) -> list[str]:
    return [f"{i}: {tokens[i]!r}" if tokens and i < len(tokens) else str(i) for i in range(n)]


def fig_attention_map(weights: np.ndarray, queries: list[int], layer: int, head: int,
                      tokens: list[str] | None = None) -> go.Figure:
    """Heatmap of attention (query rows of the window x every key up to the window's end).

    The colour scale stops at the 99th percentile: the attention sink at position 0 takes most of
    each row and would otherwise leave every other key black.
    """
    keys = weights.shape[1]
    top = float(np.quantile(weights, 0.99)) or 1.0
    labels = _labels(tokens, keys)
    fig = go.Figure(go.Heatmap(
        z=weights, x=list(range(keys)), y=queries, colorscale="Viridis", zmin=0, zmax=top,
        colorbar=dict(title="weight"),
        customdata=[[f"{labels[q]} → {labels[k]}" for k in range(keys)] for q in queries],
        hovertemplate="%{customdata}<br>weight %{z:.4f}<extra></extra>"))
    fig.update_layout(title=f"Attention map, layer {layer}, KV head {head} (mean over its query heads)",
                      xaxis_title="key position", yaxis_title="query position", yaxis_autorange="reversed",
                      template="plotly_white", height=420)
    return fig


def fig_average_attention(score: list[float], layer: int, head: int, victim: int | None = None,
                          merged_into: list[int] | None = None, sinks: int = 0, recent: int = 0,
                          tokens: list[str] | None = None, method: str = "weightedkv",
                          similar_into: list[int] | None = None) -> go.Figure:
    """Bars of ā = a / n per position; the policy's next victim red, the slot it merges into green, and
    (``similar_into``) where a most-similar-key merge of the same victim would go, purple."""
    n = len(score)
    colors = ["#9aa7b8"] * n
    merged_into = merged_into or []
    for p in similar_into or []:
        colors[p] = "#9467bd"
    for p in merged_into:
        colors[p] = "#2ca02c"
    if victim is not None:
        colors[victim] = "#d62728"
    fig = go.Figure(go.Bar(x=list(range(n)), y=score, marker_color=colors, customdata=_labels(tokens, n),
                           hovertemplate="%{customdata}<br>ā %{y:.4f}<extra></extra>"))
    if sinks:
        fig.add_vrect(x0=-0.5, x1=sinks - 0.5, fillcolor="orange", opacity=0.2, line_width=0,
                      annotation_text="sinks", annotation_position="top left")
    if recent:
        fig.add_vrect(x0=n - recent - 0.5, x1=n - 0.5, fillcolor="green", opacity=0.12, line_width=0,
                      annotation_text="recent", annotation_position="top right")
    title = f"Average attention ā = a / n, layer {layer}, KV head {head}"
    if victim is not None:
        into = ", ".join(map(str, merged_into))
        title += f" — {method} removes {victim}" + (f" and merges it into {into}" if into else " (no merge)")
        fig.add_annotation(x=victim, y=score[victim], text=f"next: {victim}" + (f" → {into}" if into else ""),
                           showarrow=True, arrowhead=2, ay=-40, font_color="#d62728")
        for p in similar_into or []:
            fig.add_annotation(x=p, y=score[p], text=f"most similar key: {p}", showarrow=True, arrowhead=2,
                               ay=-60, font_color="#9467bd")
    fig.update_layout(title=title, xaxis_title="token position", yaxis_title="ā", yaxis_type="log",
                      template="plotly_white", height=360, showlegend=False)
    return fig


def fig_replay_kept(replays: dict[str, Replay], step: int, head: int) -> go.Figure:
    """Which positions each method holds after token ``step``: one strip per method.

    Markers: grey = held, red x = removed at this step, green = value changed at this step (merged into).
    """
    fig, shown = go.Figure(), set()

    def strip(xs, name, label, marker):
        fig.add_trace(go.Scatter(x=xs, y=[name] * len(xs), mode="markers", name=label, marker=marker,
                                 legendgroup=label, showlegend=label not in shown))
        shown.add(label)

    for name, rep in replays.items():
        slots = rep.steps[step][head]
        fresh = set(slots.merged_into)
        strip([p for p in slots.positions if p not in fresh], name, "held",
              dict(symbol="line-ns-open", size=16, line_width=2, color="#4c78a8"))
        if fresh:
            strip(sorted(fresh), name, "merged into", dict(symbol="diamond", size=11, color="#2ca02c"))
        if slots.evicted is not None:
            strip([slots.evicted], name, "removed", dict(symbol="x", size=12, color="#d62728"))
    first = next(iter(replays.values()))
    fig.update_layout(title=f"Slots held after token {step} (layer {first.layer}, KV head {head}, "
                            f"budget {first.budget})",
                      xaxis_title="original token position", xaxis_range=[-1, len(first.token_ids)],
                      template="plotly_white", height=140 + 45 * len(replays), legend_orientation="h",
                      legend_y=-0.35)
    return fig


def fig_mixing(replay: Replay, step: int, head: int, tokens: list[str] | None = None) -> go.Figure:
    """Which original tokens each held slot's value mixes after token ``step`` (rows: slots by position)."""
    if replay.mixing is None:
        raise ValueError("this replay has no mixtures")
    weights = replay.mixing[step][head][:, : step + 1]  # (slots, step + 1)
    held = replay.steps[step][head].positions
    labels = _labels(tokens, step + 1)
    fig = go.Figure(go.Heatmap(
        z=np.where(weights > 0, weights, np.nan), x=list(range(step + 1)), y=[f"slot @ {p}" for p in held],
        colorscale="YlGnBu", zmin=0, zmax=1, colorbar=dict(title="weight"),
        customdata=[[labels[k] for k in range(step + 1)] for _ in held],
        hovertemplate="%{y} mixes %{customdata}<br>weight %{z:.3f}<extra></extra>"))
    mixed = int(((weights > 0).sum(axis=1) > 1).sum())
    fig.update_layout(title=f"{replay.method}: what each slot's value mixes after token {step} "
                            f"({mixed} of {len(held)} slots hold a mixture)",
                      xaxis_title="original token", yaxis_title="slot (position of its key)",
                      yaxis_autorange="reversed", template="plotly_white", height=max(320, 14 * len(held) + 140))
    return fig
