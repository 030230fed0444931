"""Figures of singular-value spectra (pure builders: SpectraResult -> plotly Figure).

- ``fig_key_vs_value``: Fig. 1 of WeightedKV. sigma_i/sigma_1 per sequence, mean +- 1 std band,
  log y. Averaged over all (layer, head) pairs unless a layer/head is chosen; the band is then the
  std over all (layer, head, sequence) spectra (law of total variance over the per-head stats).
- ``fig_rank_heatmaps``: a layer x head heatmap per kind, one shared colour scale.
- ``fig_rope_keys``: pre- vs post-RoPE keys of one head: spectra and cumulative energy.
"""

from __future__ import annotations

import math

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.errors import UserError
from analysis.spectra.compute import LABELS, SpectraResult

COLOURS = {"key_pre_rope": "#1f77b4", "key_post_rope": "#ff7f0e", "value": "#2ca02c",
           "query_post_rope": "#9467bd"}


NORM = "σᵢ/σ₁ per sequence, mean ± 1 std"


FLOOR = 1e-4  # lower edge of the band on a log axis (mean - std can be <= 0)


METRIC_LABELS = {"rank_90": "rank at 90% energy (mean over sequences)",
                 "rank_99": "rank at 99% energy (mean over sequences)",
                 "effective_rank": "effective rank exp(H(σ/Σσ)) (mean over sequences)"}


def _pooled(result: SpectraResult, kind: str, layer=None, head=None) -> tuple[list[float], list[float]]:
    """Mean and std of sigma_i/sigma_1 over the selected heads and all their sequences."""
    rows = result.select(kind, layer, head)
    n = len(rows[0].singular_values)
    mean = [sum(r.singular_values[i] for r in rows) / len(rows) for i in range(n)]
    var = [sum(r.singular_values_std[i] ** 2 + (r.singular_values[i] - mean[i]) ** 2 for r in rows) / len(rows)
           for i in range(n)]
    return mean, [math.sqrt(v) for v in var]


def _band(fig, x, mean, std, name, colour, row=None, col=None, dash=None):
    where = {"row": row, "col": col} if row else {}
    lower = [max(m - s, FLOOR) for m, s in zip(mean, std)]
    upper = [m + s for m, s in zip(mean, std)]
    fig.add_trace(go.Scatter(x=x + x[::-1], y=upper + lower[::-1], fill="toself", fillcolor=colour,
                             opacity=0.2, line={"width": 0}, hoverinfo="skip", showlegend=False,
                             legendgroup=name), **where)
    fig.add_trace(go.Scatter(x=x, y=mean, name=name, legendgroup=name, mode="lines",
                             line={"color": colour, "dash": dash}), **where)


def _scope(result: SpectraResult, layer, head) -> str:
    if layer is None and head is None:
        return f"mean over {len(result.layers)} layer(s) and all heads"
    return (f"layer {layer}" if layer is not None else "all layers") + ", " + (
        f"head {head}" if head is not None else "all heads")


def _source(result: SpectraResult) -> str:
    return (f"{result.model}, {result.sequences} seq × {result.tokens} tokens"
            + (", mean-centred" if result.center else ""))


def fig_key_vs_value(result: SpectraResult, layer: int | None = None, head: int | None = None) -> go.Figure:
    """Normalised spectra of keys (pre and post RoPE) vs values; log y, mean ± std band."""
    fig = go.Figure()
    x = list(range(1, result.head_dim + 1))
    for kind in ("key_pre_rope", "key_post_rope", "value"):
        if kind in result.kinds:
            mean, std = _pooled(result, kind, layer, head)
            _band(fig, x, mean, std, LABELS[kind], COLOURS[kind])
    fig.update_layout(
        title=f"Keys vs values: normalised singular values ({NORM})<br><sup>{_scope(result, layer, head)}; "
              f"{_source(result)}; band floored at {FLOOR:g}</sup>",
        xaxis_title="singular value index i", yaxis_title="σᵢ / σ₁ (log scale)",
        yaxis_type="log", template="plotly_white", width=900, height=550)
    return fig


def fig_rank_heatmaps(result: SpectraResult, metric: str = "rank_90", kinds=None) -> go.Figure:
    """Layer x head heatmap of ``metric`` for each kind, side by side, one colour scale."""
    if metric not in METRIC_LABELS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRIC_LABELS)}")
    field = "rank_90_mean" if metric == "rank_90" else "rank_99_mean" if metric == "rank_99" else metric
    kinds = [k for k in (kinds or result.kinds) if k in result.kinds]
    grids = [result.matrix(k, field) for k in kinds]
    values = [v for z in grids for row in z for v in row if not math.isnan(v)]  # shared colour scale
    widths = [result.num_heads(k) + 2 for k in kinds]
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[LABELS.get(k, k) for k in kinds],
                        column_widths=[w / sum(widths) for w in widths], horizontal_spacing=0.05)
    for i, (kind, z) in enumerate(zip(kinds, grids), start=1):
        fig.add_trace(go.Heatmap(
            z=z, x=list(range(len(z[0]))), y=[str(l) for l in result.layers], coloraxis="coloraxis",
            hovertemplate=f"{LABELS.get(kind, kind)}<br>layer %{{y}}, head %{{x}}<br>{metric} %{{z:.2f}}"
                          "<extra></extra>"), row=1, col=i)
        fig.update_xaxes(title_text="head", dtick=1, row=1, col=i)
    fig.update_yaxes(title_text="layer", type="category", row=1, col=1)
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(
        title=f"{METRIC_LABELS[metric]} per (layer, head), of {result.head_dim} dims<br><sup>"
              f"energy = σ², ranks from per-sequence spectra; {_source(result)}</sup>",
        coloraxis={"colorscale": "Viridis", "cmin": min(values), "cmax": max(values), "colorbar": {"title": metric}},
        template="plotly_white", width=min(1600, 300 + 40 * sum(widths)),
        height=max(450, 22 * len(result.layers) + 200))
    return fig


def fig_rope_keys(result: SpectraResult, layer: int, head: int) -> go.Figure:
    """Pre- vs post-RoPE keys of one (layer, KV head): sigma_i/sigma_1 and cumulative energy."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=[f"normalised spectrum ({NORM})",
                                                        "cumulative energy Σⱼ≤ᵢ σⱼ² / Σ σ² (mean)"])
    x = list(range(1, result.head_dim + 1))
    for kind, dash in (("key_pre_rope", None), ("key_post_rope", "dash")):
        if kind not in result.kinds:
            continue
        row = result.select(kind, layer, head)[0]
        name = f"{LABELS[kind]} (rank₉₀ {row.rank_90_mean:.1f}, erank {row.effective_rank:.1f})"
        _band(fig, x, row.singular_values, row.singular_values_std, name, COLOURS[kind], 1, 1, dash)
        fig.add_trace(go.Scatter(x=x, y=row.cumulative_energy, mode="lines", showlegend=False, legendgroup=name,
                                 line={"color": COLOURS[kind], "dash": dash}, name=LABELS[kind]), row=1, col=2)
    for level in (0.90, 0.99):
        fig.add_hline(y=level, line={"color": "grey", "width": 1, "dash": "dot"}, row=1, col=2)
    fig.update_yaxes(type="log", title_text="σᵢ / σ₁ (log scale)", row=1, col=1)
    fig.update_yaxes(title_text="cumulative energy", range=[0, 1.02], row=1, col=2)
    fig.update_xaxes(title_text="singular value index i")
    fig.update_layout(title=f"RoPE and key rank: layer {layer}, KV head {head}<br><sup>{_source(result)}</sup>",
                      template="plotly_white", width=1100, height=500,
                      legend={"orientation": "h", "y": -0.2})
    return fig


def standard_figures(result: SpectraResult, layer: int | None = None, head: int = 0) -> dict[str, go.Figure]:
    """The figures a spectra run writes, by file stem. ``layer`` (default: the middle analysed
    layer) and ``head`` pick the head of the RoPE figure."""
    figs = {"key_vs_value": fig_key_vs_value(result),
            "rank_90_heatmaps": fig_rank_heatmaps(result, "rank_90"),
            "effective_rank_heatmaps": fig_rank_heatmaps(result, "effective_rank")}
    if "key_pre_rope" in result.kinds and "key_post_rope" in result.kinds:
        layer = result.layers[len(result.layers) // 2] if layer is None else layer
        figs[f"rope_keys_layer{layer}_head{head}"] = fig_rope_keys(result, layer, head)
    return figs
