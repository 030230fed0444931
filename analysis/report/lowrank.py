"""Figures of the low-rank comparison (``compare.json``) and of what each rank costs per head (``cost.json``)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

FAMILY_COLOURS = {"token": qualitative.Plotly[0], "merge": qualitative.Plotly[1],
                  "lowrank": qualitative.Plotly[2], "combined": qualitative.Plotly[3],
                  "reference": "grey"}
SYMBOLS = {"token": "circle", "merge": "diamond", "lowrank": "square", "combined": "star", "reference": "x"}


def fig_ppl_vs_bytes(compare: dict) -> go.Figure:
    """Perplexity against cache bytes (fraction of the full cache), one marker set per family, Pareto front marked."""
    rows, front = compare["rows"], set(compare.get("pareto", []))
    fig = go.Figure()
    for family in ("reference", "token", "merge", "lowrank", "combined"):
        sub = sorted((r for r in rows if r["family"] == family), key=lambda r: r["bytes"])
        if not sub:
            continue
        fig.add_trace(go.Scatter(
            x=[r["fraction"] for r in sub], y=[r["ppl"] for r in sub], mode="markers", name=family,
            marker=dict(color=FAMILY_COLOURS[family], symbol=SYMBOLS[family], size=9),
            text=[r["config"] for r in sub],
            hovertemplate="%{text}<br>%{x:.3f} of the full bytes<br>ppl %{y:.3f}<extra></extra>"))
    on_front = sorted((r for r in rows if r["config"] in front), key=lambda r: r["bytes"])
    if on_front:
        fig.add_trace(go.Scatter(x=[r["fraction"] for r in on_front], y=[r["ppl"] for r in on_front],
                                 mode="lines", name="Pareto front", line=dict(color="black", dash="dot")))
    for f in compare.get("fractions", []):
        fig.add_vline(x=f, line_dash="dash", line_color="lightgrey")
    fig.update_layout(title=f"Perplexity vs cache bytes — {compare['model']}, window {compare['window']}, "
                            f"{len(compare['documents'])} held-out document(s)",
                      xaxis_title="cache bytes, fraction of the full cache (log)", yaxis_title="perplexity (log)",
                      xaxis_type="log", yaxis_type="log", width=1000, height=600)
    return fig


def fig_rank_cost(cost: dict) -> go.Figure:
    """Per (layer, KV head): output error of rank-r keys against the head's pre-RoPE key rank at 90 % energy."""
    rows = cost["rows"]
    fig = go.Figure()
    for i, r in enumerate(sorted({row["rank"] for row in rows})):
        sub = [row for row in rows if row["rank"] == r]
        fig.add_trace(go.Scatter(
            x=[row["key_rank_90"] for row in sub], y=[row["output_error"] for row in sub], mode="markers",
            name=f"rank {r} (ρ = {cost['correlation'].get(str(r), float('nan')):.2f})",
            marker=dict(color=qualitative.Plotly[i % 10]),
            text=[f"layer {row['layer']}, KV head {row['kv_head']}" for row in sub],
            hovertemplate="%{text}<br>key rank 90%: %{x:.1f}<br>output error %{y:.4f}<extra></extra>"))
    fig.update_layout(title="What rank r costs each head: attention-output error vs the head's key rank",
                      xaxis_title="pre-RoPE key rank at 90 % energy (spectra, same text)",
                      yaxis_title="relative attention-output error ||o_r − o|| / ||o|| (log)", yaxis_type="log",
                      width=1000, height=600)
    return fig


def compare_table(compare: dict) -> list[dict]:
    """Rows for a table: one per configuration at each asked fraction, with the per-document spread."""
    out = []
    for r in sorted(compare["rows"], key=lambda r: (-(r["target_fraction"] or 2), r["ppl"])):
        docs = list(r["per_document_ppl"].values())
        out.append({"fraction": r["target_fraction"], "config": r["config"], "family": r["family"],
                    "bytes": r["bytes"], "ppl": round(r["ppl"], 3),
                    "per-document min-max": f"{min(docs):.2f}-{max(docs):.2f}" if docs else ""})
    return out


def fig_energy_lost(result, rank: int) -> go.Figure:
    """What rank r costs, from the spectra alone: 1 - cumulative energy at r per (layer, KV head), keys vs values."""
    kinds = [k for k in ("key_pre_rope", "value") if k in result.kinds]
    fig = make_subplots(rows=1, cols=len(kinds), subplot_titles=[f"{k.replace('_', ' ')}: energy lost at rank {rank}"
                                                                  for k in kinds])
    for i, kind in enumerate(kinds):
        grid = [[float("nan")] * result.num_heads(kind) for _ in result.layers]
        row_of = {layer: j for j, layer in enumerate(result.layers)}
        for r in result.select(kind):
            grid[row_of[r.layer]][r.head] = 1 - r.cumulative_energy[min(rank, len(r.cumulative_energy)) - 1]
        fig.add_trace(go.Heatmap(z=grid, y=result.layers, x=list(range(result.num_heads(kind))), zmin=0, zmax=1,
                                 colorscale="Viridis", showscale=i == len(kinds) - 1,
                                 hovertemplate="layer %{y}, head %{x}: %{z:.3f} of the energy lost<extra></extra>"),
                      row=1, col=i + 1)
        fig.update_xaxes(title_text="KV head", row=1, col=i + 1)
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_layout(title=f"What rank {rank} costs each head (relative reconstruction error, spectra)",
                      width=1000, height=600)
    return fig
