"""Figures and the result directory of a retrieval grid (``retrieval.json``), for the command and the page.

- ``fig_needle_heatmap``: accuracy over length x depth, one panel per method and budget;
- ``fig_retrieval_vs_budget``: accuracy (Wilson 95 % interval) and answer log-probability against budget;
- ``fig_fates``: where the fact's tokens went (kept / merged / gone), for trials answered right and wrong.
"""

from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.io import atomic_dir, write_json
from analysis.report.export import write_figure
from analysis.report.perplexity import COLOURS
from analysis.retrieval.summary import CELL_COLUMNS, FATES, PAIRED_COLUMNS, TRIAL_COLUMNS, flat_cell, to_csv, wilson

FATE_COLOURS = {"kept": "#2ca02c", "merged": "#ff7f0e", "gone": "#7f7f7f"}


def _label(method: str, budget) -> str:
    return method if budget is None else f"{method} m={budget}"


def _panels(rows: list[dict]) -> list[tuple[str, int | None]]:
    """(method, budget) pairs in the rows' order, the reference first."""
    seen = dict.fromkeys((r["method"], r["budget"]) for r in rows)
    return sorted(seen, key=lambda mb: (mb[1] is not None, mb[1] or 0))


def _title(result: dict, what: str) -> str:
    s = result["settings"]
    return f"{what} — {s['task']}, {s['mode']} mode, {result['model']}"


def fig_needle_heatmap(result: dict) -> go.Figure:
    """Accuracy (colour) over context length (rows) x depth (columns), one panel per method and budget."""
    rows = result["rows"]
    panels = _panels(rows)
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=[_label(*p) for p in panels],
                        horizontal_spacing=0.06, vertical_spacing=0.12)
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    for i, (method, budget) in enumerate(panels):
        acc = {(r["length"], r["depth"]): r for r in rows if r["method"] == method and r["budget"] == budget}
        z = [[acc[(L, d)]["accuracy"] if (L, d) in acc else None for d in depths] for L in lengths]
        text = [[f"{acc[(L, d)]['correct']}/{acc[(L, d)]['trials']}" if (L, d) in acc else "" for d in depths]
                for L in lengths]
        fig.add_trace(go.Heatmap(z=z, x=[f"{d}%" for d in depths], y=[str(L) for L in lengths], text=text,
                                 texttemplate="%{text}", zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=i == 0, colorbar=dict(title="accuracy"),
                                 hovertemplate="length %{y}, depth %{x}: accuracy %{z:.2f} (%{text})<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(type="category")
    fig.update_xaxes(title_text="depth", row=nrows)
    fig.update_yaxes(type="category")  # one length must not become a numeric axis with fractional ticks
    fig.update_yaxes(title_text="tokens", col=1)
    fig.update_layout(title=_title(result, "Retrieval accuracy by length and depth"), height=260 * nrows + 120,
                      width=1100)
    return fig


def pooled(result: dict) -> list[dict]:
    """Per (method, budget), over every length and depth: accuracy with its Wilson interval, mean log-prob."""
    out = []
    for method, budget in _panels(result["rows"]):
        part = [r for r in result["rows"] if r["method"] == method and r["budget"] == budget]
        k, n = sum(r["correct"] for r in part), sum(r["trials"] for r in part)
        low, high = wilson(k, n)
        logp = sum(r["answer_logprob"] * r["trials"] for r in part) / n
        out.append({"method": method, "budget": budget, "correct": k, "trials": n, "accuracy": k / n,
                    "ci_low": low, "ci_high": high, "answer_logprob": logp})
    return out


def fig_retrieval_vs_budget(result: dict) -> go.Figure:
    """Accuracy (with Wilson 95 % intervals) and mean answer log-probability against budget; full dashed."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["accuracy (95 % Wilson)", "answer log-probability"])
    points = pooled(result)
    for p in points:
        if p["budget"] is None:
            fig.add_hline(y=p["accuracy"], line_dash="dash", line_color="grey", row=1, col=1,
                          annotation_text=f"full {p['accuracy']:.2f}")
            fig.add_hline(y=p["answer_logprob"], line_dash="dash", line_color="grey", row=1, col=2,
                          annotation_text=f"full {p['answer_logprob']:.2f}")
    for method in dict.fromkeys(p["method"] for p in points if p["budget"] is not None):
        mine = sorted((p for p in points if p["method"] == method and p["budget"] is not None),
                      key=lambda p: p["budget"])
        x = [p["budget"] for p in mine]
        colour = COLOURS.get(method)
        fig.add_trace(go.Scatter(x=x, y=[p["accuracy"] for p in mine], mode="lines+markers", name=method,
                                 legendgroup=method, line_color=colour,
                                 error_y=dict(type="data", symmetric=False,
                                              array=[p["ci_high"] - p["accuracy"] for p in mine],
                                              arrayminus=[p["accuracy"] - p["ci_low"] for p in mine])),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=[p["answer_logprob"] for p in mine], mode="lines+markers", name=method,
                                 legendgroup=method, showlegend=False, line_color=colour), row=1, col=2)
    budgets = sorted({p["budget"] for p in points if p["budget"] is not None})
    title = "cache size m (slots per layer and KV head)"
    if len(budgets) > 1:  # ticks at the budgets run, not log-axis decades
        fig.update_xaxes(title_text=title, type="log", tickvals=budgets, ticktext=[str(b) for b in budgets])
    else:  # one budget: a log axis would show stray fractional ticks around it
        fig.update_xaxes(title_text=title, type="category")
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    fig.update_layout(title=_title(result, "Retrieval against budget"), width=1100, height=500)
    return fig


def fig_fates(result: dict) -> go.Figure:
    """Mean kept / merged / gone fractions of the fact's tokens, per method and budget, right vs wrong answers."""
    trials = result["trials"]
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        if t["budget"] is not None:
            groups.setdefault((_label(t["method"], t["budget"]), "right" if t["correct"] else "wrong"), []).append(t)
    keys = sorted(groups, key=lambda k: (k[0], k[1]))
    fig = go.Figure()
    for fate in FATES:
        fig.add_trace(go.Bar(x=[[k[0] for k in keys], [f"{k[1]} ({len(groups[k])})" for k in keys]],
                             y=[sum(t[f"fate_{fate}"] for t in groups[k]) / len(groups[k]) for k in keys],
                             name=fate, marker_color=FATE_COLOURS[fate]))
    fig.update_layout(barmode="stack", title=_title(result, "Where the fact went, answered right vs wrong"),
                      yaxis_title="fraction of (token, layer, KV head)", yaxis_range=[0, 1], width=1100, height=520)
    return fig


FIGURES = {"needle_heatmap": fig_needle_heatmap, "retrieval_vs_budget": fig_retrieval_vs_budget, "fates": fig_fates}


def write_retrieval(directory: Path, result: dict, png: bool = True) -> None:
    """retrieval.json, retrieval.csv, trials.csv, by_fate.csv, paired.csv and the figures, into ``directory``."""
    directory = Path(directory)
    write_json(directory / "retrieval.json", result)
    (directory / "retrieval.csv").write_text(to_csv([flat_cell(r) for r in result["rows"]], CELL_COLUMNS))
    (directory / "trials.csv").write_text(to_csv(result["trials"], TRIAL_COLUMNS))
    columns = ("method", "budget", "by", "group", "trials", "correct", "accuracy", "ci_low", "ci_high",
               "answer_logprob", "answer_logprob_std")
    (directory / "by_fate.csv").write_text(to_csv(result["by_fate"], columns))
    (directory / "paired.csv").write_text(to_csv(result.get("paired", []), PAIRED_COLUMNS))  # older results: none
    for name, build in FIGURES.items():
        write_figure(build(result), directory, name, png=png)


def save_retrieval(out: Path, result: dict, overwrite: bool = False, png: bool = True) -> Path:
    """``write_retrieval`` into ``out`` as one directory, atomically."""
    with atomic_dir(out, overwrite) as tmp:
        write_retrieval(tmp, result, png=png)
    return Path(out)
