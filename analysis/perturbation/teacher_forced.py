"""Teacher-forced budget sweep: how far each head's attention output moves under each method and budget.

For one layer, the captured post-RoPE queries, keys and values of a sequence are fed token by token
through a ``LayerState`` held to budget m by a policy, exactly as ``CompressedCache`` does inside the
model: append the token, attend over the held slots (``analysis.runtime.kernel.slot_attention``), observe
the weights, compress. The relative error of the attention output against the uncompressed cache,

    e_t = ||o_t - o_t^full|| / ||o_t^full||,

is recorded at every step for every query head and averaged over each KV head's query group.

Every (method, budget) job of the sweep is a batch row of one state (``RowPolicies``), so a layer
is one pass over the tokens for all jobs, vectorised over rows and heads. The uncompressed
reference is replayed by the same code: jobs that never compress (``full``, or a budget >= the
sequence length) share its rows and capacity, so their error is exactly 0. Memory is one layer's
state at a time: never T x T attention for every layer.

Attention is the layer's own (``AttentionSpec``, from the capture: ``Capture.attention(layer)``):
its scaling (Gemma's ``query_pre_attn_scalar``), soft-cap and window, so the replay of the full cache
equals the model's attention output. Layers the model runs with a sliding window are not compressed
by ``CompressedCache``; the studies leave them out (``analysis.models.loading.compressed_layers``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from analysis.compress import LayerState, RowPolicies, StreamingLLM
from analysis.jobs.job import Job
from analysis.ops import AttentionSpec, group_mean, relative_error
from analysis.runtime.kernel import slot_attention


@dataclass
class TeacherForcedErrors:
    jobs: list[tuple[str, int]]  # (method, budget); budget = T for full
    error: Tensor  # (J, B, H, T) relative output error per job, sequence, KV head, step
    first_full: list[int]  # per job: first step at which the cache is full (its budget), T for none
    state: LayerState | None = None  # the compressing jobs' final state: job ``squeezed[i]`` holds rows i*B .. i*B+B-1
    squeezed: tuple[int, ...] = ()

    def mean_after_fill(self) -> Tensor:
        """(J, B, H): mean error over the steps from the one where the cache first fills."""
        T = self.error.shape[-1]
        out = torch.zeros(self.error.shape[:3])
        for j, start in enumerate(self.first_full):
            out[j] = self.error[j, ..., min(start, T - 1):].mean(-1)
        return out


def _replay(queries: Tensor, keys: Tensor, values: Tensor, policy, rows: list[int], budgets: list[int],
            layer: int, capacity: int, spec: AttentionSpec) -> tuple[Tensor, LayerState]:
    """Outputs (R*B, Hq, T, Dv) and final state of R = len(rows) jobs x B sequences; row r*B + b."""
    B, Hq, T, D = queries.shape
    R = len(rows)
    q, k, v = (t.repeat(R, 1, 1, 1) for t in (queries, keys, values))  # (R*B, ·, T, ·): job-major rows
    state = LayerState.empty(k[:, :, :0], v[:, :, :0], capacity, stats=policy.stats, layer=layer,
                             row_ids=torch.arange(B).repeat(R))
    state.budget = torch.tensor(budgets).repeat_interleave(B)[:, None].expand(R * B, k.shape[1]).contiguous()
    state.budget_range = (min(budgets), max(budgets))
    out = torch.empty((R * B, Hq, T, v.shape[-1]))
    for t in range(T):
        state.append(k[:, :, t : t + 1], v[:, :, t : t + 1])
        held = (state.positions >= 0)[:, :, None, :]  # (R*B, H, 1, C): the newest token sees every held slot
        if spec.window is not None:  # ... that lies inside its window
            held = held & (state.positions > t - spec.window)[:, :, None, :]
        o, w = slot_attention(q[:, :, t : t + 1], state.keys, state.values, held, spec.scaling,
                              softcap=spec.softcap)  # (R*B, Hq, 1, Dv)
        state.observe(w)
        policy.compress(state)
        out[:, :, t] = o[:, :, 0].float()
    return out, state


@torch.inference_mode()
def full_replay(queries: Tensor, keys: Tensor, values: Tensor, spec: AttentionSpec | None = None,
                layer: int = 0) -> Tensor:
    """(B, Hq, T, Dv) float32: the uncompressed reference the sweep compares with, token by token through a
    ``LayerState`` (equal to the model's attention output at that layer: tested on Gemma 2/3)."""
    T = queries.shape[2]
    reference = StreamingLLM(T + 1, sinks=0, recent=0)  # never reaches its budget
    B = queries.shape[0]
    out, _ = _replay(queries, keys, values, RowPolicies(policies=[reference], rows=[0] * B), [0], [T + 1], layer,
                     T + 1, spec or AttentionSpec())
    return out


@torch.inference_mode()
def teacher_forced_layer(queries: Tensor, keys: Tensor, values: Tensor, jobs: list[Job],
                         layer: int = 0, spec: AttentionSpec | None = None) -> TeacherForcedErrors:
    """Teacher-forced errors of every job at one layer. queries (B, Hq, T, D), keys/values (B, H, T, D);
    ``spec``: the layer's scaling, soft-cap and window (None: 1/sqrt(D), none, full causal)."""
    spec = spec or AttentionSpec()
    B, Hq, T, _ = queries.shape
    H = keys.shape[1]
    never = [i for i, job in enumerate(jobs) if not job.compresses or job.budget >= T]
    squeeze = [i for i in range(len(jobs)) if i not in never]
    # the uncompressed reference and every job that never compresses: one row group, capacity T
    reference = StreamingLLM(T + 1, sinks=0, recent=0)  # never reaches its budget
    ref_rows = [0] + never
    ref, _ = _replay(queries, keys, values, RowPolicies(policies=[reference], rows=[0] * (len(ref_rows) * B)), ref_rows,
                     [T + 1] * len(ref_rows), layer, T + 1, spec)
    ref = ref.view(len(ref_rows), B, Hq, T, -1)
    full = ref[0]  # (B, Hq, T, Dv)
    outputs = {i: ref[1 + n] for n, i in enumerate(never)}
    state = None
    if squeeze:
        policies = [jobs[i].policy for i in squeeze]
        rows = RowPolicies(policies=policies, rows=[j for j in range(len(squeeze)) for _ in range(B)])  # job-major rows
        budgets = [jobs[i].budget for i in squeeze]
        got, state = _replay(queries, keys, values, rows, list(range(len(squeeze))), budgets, layer,
                             max(budgets) + 1, spec)
        got = got.view(len(squeeze), B, Hq, T, -1)
        outputs |= {i: got[n] for n, i in enumerate(squeeze)}
    error = torch.stack([relative_error(outputs[i], full) for i in range(len(jobs))])  # (J, B, Hq, T)
    error = group_mean(error, H, dim=2)  # (J, B, H, T): mean over each KV head's group
    labels = [(job.method, job.budget if job.compresses else T) for job in jobs]
    return TeacherForcedErrors(labels, error, [b if b < T else T for _, b in labels], state, tuple(squeeze))


def teacher_forced_capture(capture, jobs: list[Job], layers=None, progress=None) -> dict[int, TeacherForcedErrors]:
    """``teacher_forced_layer`` for each captured layer (one layer's state in memory at a time)."""
    layers = capture.layers if layers is None else list(layers)
    results = {}
    for layer in layers:
        results[layer] = teacher_forced_layer(capture.get(layer, "query_post_rope"),
                                              capture.get(layer, "key_post_rope"), capture.get(layer, "value"),
                                              jobs, layer, capture.attention(layer))
        if progress is not None:
            progress(1)
    return results
