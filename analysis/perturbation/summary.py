"""Merging effects head by head: the paper's Fig. 2 protocol and the teacher-forced budget sweep.

Both work one sequence at a time on a capture of that sequence (all chosen layers), so memory is
one sequence's layers x heads x T x d plus one layer's working set; results are stacked over
sequences and summarised as mean ± std *over sequences*.

Fig. 2 (``fig2_sequence``): at step t0 the uncompressed cache of tokens 0..t0-1 gives up one
slot, the token with the lowest average attention ā, once merged (``weightedkv``) and once evicted
(``weightedkv_evict``, same victim), through ``analysis.perturbation.one_step.perturb_state`` (the policies'
own ``select`` / ``merge`` / ``remove``). The next N captured queries attend over [compressed past
+ true future tokens]; per step we record the relative output error and two attention cosines.
The dropped position in the cosine: ``attn_cosine`` leaves it out of the full run's weights (the
remaining weights are compared as they are; renormalising does not change a cosine),
``attn_cosine_padded`` keeps it, the compressed run holding weight 0 there. The victim is chosen as
the policy chooses it: among positions >= sinks and older than the ``recent`` newest (the policies'
default recent is budget // 2 - sinks, 45 for t0 = 100; ``recent=1`` lets every older token compete).

Teacher-forced (``teacher_forced_sequence``, the command's ``sweep`` mode):
``analysis.perturbation.teacher_forced.teacher_forced_layer`` per layer, every (method, budget) job a
batch row of one ``LayerState`` run token by token exactly as ``CompressedCache``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.jobs.job import Job
from analysis.ops import group_mean
from analysis.perturbation.one_step import METRICS, _run
from analysis.perturbation.teacher_forced import teacher_forced_layer

CURVE_POINTS = 200  # curves in the JSON are thinned to about this many points; full ones go to curves.safetensors


def fig2_sequence(capture, layers: list[int], jobs: list[Job], t0: int = 100,
                  future: int = 800) -> dict[tuple[str, str], Tensor]:
    """One sequence (capture row 0): ``{(metric, method): (L, H, N)}`` per layer, KV head and step, each job
    compressing the cache of t0 tokens by one slot (``one_step.pair_jobs(t0)``: budget t0 - 1)."""
    out: dict[tuple[str, str], list[Tensor]] = {}
    for layer in layers:
        H = capture.get(layer, "key_post_rope").shape[1]
        res = _run(capture, layer, t0, future, 0, jobs)
        for method in (job.method for job in jobs):
            for metric in METRICS:
                out.setdefault((metric, method), []).append(group_mean(res[method][metric], H)[0])  # (H, N)
    return {key: torch.stack(v) for key, v in out.items()}


def teacher_forced_sequence(capture, layers: list[int],
                            jobs: list[Job]) -> tuple[Tensor, Tensor, list[tuple[str, int]]]:
    """One sequence: errors (J, L, H, T) per step and means after the cache fills (J, L, H), and job labels."""

    curves, means, labels = [], [], None
    for layer in layers:
        result = teacher_forced_layer(capture.get(layer, "query_post_rope")[:1],
                                      capture.get(layer, "key_post_rope")[:1], capture.get(layer, "value")[:1],
                                      jobs, layer, capture.attention(layer))
        curves.append(result.error[:, 0])  # (J, H, T)
        means.append(result.mean_after_fill()[:, 0])  # (J, H)
        labels = result.jobs
    return torch.stack(curves, 1), torch.stack(means, 1), labels


def thin(curve: Tensor, points: int = CURVE_POINTS) -> tuple[list[int], list[float]]:
    """(T,) -> (steps, values) every ceil(T / points)-th step, values to 6 significant digits."""
    step = max(1, -(-curve.shape[-1] // points))
    idx = list(range(0, curve.shape[-1], step))
    return idx, [float(f"{v:.6g}") for v in curve[idx].tolist()]


def summary_rows(per_sequence: Tensor, curves: Tensor | None, labels: dict, layers: list[int],
                 kv_heads: bool = True) -> list[dict]:
    """Rows of mean ± std over sequences.

    per_sequence (S, L, H) (or (S, L) without ``kv_heads``): one number per sequence and cell;
    curves (S, L, H, T) or None: per step. One row per (layer, KV head), then one overall row
    (``layer``/``kv_head`` None: mean over layers and heads first, then over sequences) carrying
    each sequence's value and the thinned curve with its band (std over sequences).
    """
    rows = []
    S = per_sequence.shape[0]
    std = lambda t: t.std(0, unbiased=False)  # noqa: E731  (over sequences)
    m, s = per_sequence.mean(0), std(per_sequence)
    for i, layer in enumerate(layers):
        heads = range(per_sequence.shape[2]) if kv_heads else [None]
        for h in heads:
            cell = (i, h) if h is not None else (i,)
            rows.append(labels | {"layer": layer, "kv_head": h, "mean": float(m[cell]), "std": float(s[cell]),
                                  "sequences": S})
    flat = per_sequence.reshape(S, -1).mean(1)  # (S,)
    overall = labels | {"layer": None, "kv_head": None, "mean": float(flat.mean()),
                        "std": float(flat.std(unbiased=False)), "sequences": S,
                        "per_sequence": [float(x) for x in flat]}  # paired comparisons across methods
    if curves is not None:
        curve = curves.reshape(S, -1, curves.shape[-1]).mean(1)  # (S, T): mean over layers and heads
        steps, mean = thin(curve.mean(0))
        overall |= {"steps": steps, "curve": mean, "curve_std": thin(std(curve))[1]}
    rows.append(overall)
    return rows
