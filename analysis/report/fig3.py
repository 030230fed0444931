"""WeightedKV Fig. 3 replayed (``analysis.perturbation.toy.toy_replay``): the cache step by step, the final mixtures."""

from __future__ import annotations

from fractions import Fraction

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.perturbation.toy import Step, label

ROLE_COLOURS = {"kept": "#c6dbef", "victim": "#e6550d", "neighbour": "#31a354"}


def _fraction(x: float) -> str:
    if x < 5e-7:
        return ""
    f = Fraction(x).limit_denominator(64)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def fig_fig3_replay(steps: list[Step], budget: int = 4) -> go.Figure:
    """Left: the held tokens at every step with their average attention ā (victim red, the neighbour
    it is merged into green, the merge and its weights written beside the row). Right: what each final
    slot's value mixes."""
    final = steps[-1]
    tokens = len(final.mixtures[0])
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.12,
                        subplot_titles=[f"cache at each step (m = {budget}); number = ā = a / n",
                                        "final values as mixtures of the original values"])
    before: dict[int, int] = {}  # merges absorbed by each position before this step
    for s in steps:
        xs, colours, texts = [], [], []
        for i, (pos, avg) in enumerate(zip(s.held, s.scores)):
            role = "victim" if pos == s.victim else "neighbour" if pos == s.neighbour else "kept"
            xs.append(i)
            colours.append(ROLE_COLOURS[role])
            texts.append(f"{label(pos, before.get(pos, 0))}<br>{avg:g}")
        fig.add_trace(go.Scatter(x=xs, y=[s.step] * len(xs), mode="markers+text", text=texts,
                                 textfont=dict(size=11), showlegend=False, hoverinfo="text",
                                 marker=dict(symbol="square", size=40, color=colours,
                                             line=dict(color="#555", width=1))),
                      row=1, col=1)
        if s.victim is not None and s.neighbour is not None:
            share = f"{_fraction(s.weights[0])} : {_fraction(s.weights[1])}"
            fig.add_annotation(x=len(s.held) - 0.4, y=s.step, xref="x", yref="y", showarrow=False, xanchor="left",
                               text=f"merge {label(s.victim, before.get(s.victim, 0))} → "
                                    f"{label(s.neighbour, before.get(s.neighbour, 0))} ({share})",
                               font=dict(size=11, color="#31a354"))
        before = dict(s.merges)
    for role, colour in ROLE_COLOURS.items():  # legend entries only
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                                 name={"kept": "kept", "victim": "lowest ā: removed",
                                       "neighbour": "right neighbour: absorbs its value"}[role],
                                 marker=dict(symbol="square", size=14, color=colour)), row=1, col=1)
    names = [label(p, final.merges.get(p, 0)) for p in final.kept]
    z = final.mixtures
    fig.add_trace(go.Heatmap(z=z, x=[f"v{i + 1}" for i in range(tokens)], y=names, colorscale="Blues", zmin=0, zmax=1,
                             text=[[_fraction(v) for v in row] for row in z], texttemplate="%{text}",
                             colorbar=dict(title="weight", x=1.0),
                             hovertemplate="%{y} holds %{z:.4f} of %{x}<extra></extra>"),
                  row=1, col=2)
    fig.update_xaxes(title_text="held tokens, oldest first", range=[-0.6, 6.6], showgrid=False, zeroline=False,
                     showticklabels=False, row=1, col=1)
    fig.update_yaxes(title_text="step (token arrived)", autorange="reversed", dtick=1, zeroline=False, row=1, col=1)
    fig.update_xaxes(title_text="original token", row=1, col=2)
    fig.update_yaxes(title_text="final slot", autorange="reversed", row=1, col=2)
    fig.update_layout(title="WeightedKV, paper Fig. 3 replayed through the real policy (WeightedKV(budget=4, sinks=0, "
                            "recent=0))<br><sup>at each step over budget the token with the lowest average attention "
                            "is removed and its value merged into its right neighbour, weighted by ā</sup>",
                      template="plotly_white", width=1250, height=640,
                      legend=dict(orientation="h", y=-0.12, x=0))
    return fig
