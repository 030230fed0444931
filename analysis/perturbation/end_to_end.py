"""End to end: does a head-level perturbation move the model's prediction?

The model decodes a sequence token by token (``analysis.runtime.decode.decode_rows``, the evaluator's
own loop) with one ``CompressedCache`` whose batch rows are: row 0 the reference (a policy whose
budget exceeds the sequence, so nothing is ever compressed), then one row per (method, budget) job,
each compressed by its own policy (``RowPolicies``). Every row is teacher-forced on the same tokens,
so at every position we compare the next-token distributions: KL(full ‖ compressed), the change in
NLL of the true next token, and per layer the relative deviation of the attention block's output
``||o - o_ref|| / ||o_ref||``. Logits and attention outputs are read with forward hooks on the
output embedding and on the attention modules (public API): nothing in the decoding loop changes.

Sliding-window layers (Gemma 2/3) keep the model's own sliding cache in every row (``CompressedCache``):
only the full-attention layers are compressed, but every layer's deviation is reported, since the
sliding layers see the changed hidden states of the compressed ones.

``full`` (and any budget >= the sequence) is its own never-compressing row, so its KL is the
numerical noise of the batched decode (0 on CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.compress import RowPolicies, StreamingLLM
from analysis.jobs.job import Job
from analysis.models.loading import attention_modules
from analysis.ops import relative_error, uncompressed_prefix
from analysis.runtime.decode import decode_rows


def _never(T: int) -> StreamingLLM:
    return StreamingLLM(T + 1, sinks=0, recent=0)  # budget above T: never compresses


@torch.inference_mode()
def end_to_end(model, ids: Tensor, jobs: list[Job]) -> dict[str, Tensor]:
    """One sequence ``ids`` (T,): per job, KL (J, T-1), delta NLL (J, T-1) and deviation (J, layers, T).

    KL and ΔNLL at column t are about the prediction of token t + 1 from tokens <= t.
    """
    T = ids.shape[-1]
    squeezes = [job.compresses and job.budget < T for job in jobs]
    policies = [_never(T)] + [job.policy if sq else _never(T) for job, sq in zip(jobs, squeezes)]
    budgets = [T + 1] + [job.budget if sq else T + 1 for job, sq in zip(jobs, squeezes)]
    R = len(policies)
    rows = RowPolicies(policies=policies, rows=list(range(R)))
    uncompressed = uncompressed_prefix(T, [job.budget if sq else None for job, sq in zip(jobs, squeezes)])
    kl_parts: list[Tensor] = []
    deviation: dict[int, list[Tensor]] = {}

    def on_logits(module, args, output):
        logp = torch.log_softmax(output.float(), dim=-1)  # (R, q, V)
        kl_parts.append((logp[:1].exp() * (logp[:1] - logp)).sum(-1).cpu())  # (R, q)

    def on_attention(layer: int):
        def hook(module, args, output):
            out = (output[0] if isinstance(output, tuple) else output).float()  # (R, q, hidden)
            deviation.setdefault(layer, []).append(relative_error(out, out[:1]).cpu())  # (R, q): row 0 the reference
        return hook

    handles = [model.get_output_embeddings().register_forward_hook(on_logits)]
    handles += [m.register_forward_hook(on_attention(i)) for i, m in attention_modules(model).items()]
    try:
        nll = decode_rows(model, ids.reshape(1, T).repeat(R, 1), rows, uncompressed,
                          window_ids=[0] * R, row_budgets=budgets)  # (R, T-1); same seed row id for every job
    finally:
        for h in handles:
            h.remove()
    kl = torch.cat(kl_parts, 1)[:, : T - 1]  # (R, T-1)
    dev = torch.stack([torch.cat(deviation[i], 1) for i in sorted(deviation)], 1)  # (R, layers, T)
    return {"kl": kl[1:].clamp_min(0), "delta_nll": nll[1:] - nll[:1], "deviation": dev[1:]}
