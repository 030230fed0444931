"""Long-text perplexity under a compressed cache, with the paper's protocol (Table I, Fig. 4).

Protocol (the paper leaves details open; these are our choices, stated once here):
- each document's first N tokens are cut into windows of W tokens with stride W/2, plus one last
  window aligned to the end when the stride does not land there;
- inside a window, decoding starts from an empty cache and goes token by token through the same
  ``CompressedCache`` that ``generate()`` uses (one policy implementation, no simulation);
- the first window of a document scores every prediction, later windows only the targets no earlier
  window scored, so every token of the document from the second on is scored exactly once;
- positions are the original ones inside the window (0..W-1), so W must fit the model's RoPE range;
- randomised methods draw per window (seeded by the seed and the window's index), so a window's
  result does not depend on the batch it runs in.

Speed: while a window's cache is below the budget no method has anything to do, so those tokens go
through the model in chunks (identical attention and statistics, fewer forwards); after that, one
token per forward. Windows are batch rows, and so are a sweep's (method, budget) jobs when there are
fewer windows than the batch size (``analysis.perplexity.jobs``): each row is compressed by its own policy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.compress import Job, Policy
from analysis.runtime.cache import CompressedCache, Rows


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(b, q, V), (b, q) -> (b, q) negative log-likelihood in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None])[..., 0]


def default_chunk(rows: int) -> int:
    return max(8, 4096 // rows)  # bounds the (rows, chunk, vocab) logits of a prefill chunk


@torch.inference_mode()
def window_nll(model, ids: Tensor, job: Job, chunk: int | None = None, window_ids: list[int] | None = None) -> Tensor:
    """NLL (b, W-1) of each next token in each window row of ``ids`` (b, W), decoded under ``job``.

    Token t's prediction sees tokens <= t through a cache compressed to the job's budget slots per
    layer (or to its plan's per-head budgets). ``window_ids`` (b,) seed randomised methods per window.
    """
    return decode_rows(model, ids, job.policy, job.uncompressed(ids.shape[1]), chunk, window_ids, plan=job.plan)


def decode_rows(model, ids: Tensor, policy: Policy, uncompressed: int, chunk: int | None = None,
                window_ids: list[int] | None = None, plan=None, row_budgets: list[int] | None = None,
                row_plans: list | None = None) -> Tensor:
    """Teacher-forced NLL (b, W-1) of ``ids`` (b, W) through one CompressedCache under ``policy``.

    The first ``uncompressed`` tokens (where no row can overflow its budget) go in chunks. Rows may
    each have their own budget (``row_budgets``) or per-head plan (``row_plans``).
    """
    b, W = ids.shape
    device = next(model.parameters()).device
    row_ids = torch.tensor(window_ids if window_ids is not None else range(b))
    rows = Rows(ids=row_ids, budgets=row_budgets, plans=row_plans)
    with torch.inference_mode(), CompressedCache(model, policy, plan=plan, rows=rows) as cache:
        return _decode(model, ids.to(device), cache, uncompressed, chunk or default_chunk(b)).cpu()


def _decode(model, ids: Tensor, cache, uncompressed: int, chunk: int) -> Tensor:
    b, W = ids.shape
    device = ids.device
    nll = torch.empty((b, W - 1), device=device)
    for start in range(0, uncompressed, chunk):
        stop = min(start + chunk, uncompressed)
        positions = torch.arange(start, stop, device=device).expand(b, -1)  # (b, q)
        logits = model(ids[:, start:stop], past_key_values=cache, position_ids=positions, use_cache=True).logits
        nll[:, start:stop] = _nll(logits, ids[:, start + 1 : stop + 1])
    for t in range(uncompressed, W - 1):
        positions = torch.full((b, 1), t, device=device)
        logits = model(ids[:, t : t + 1], past_key_values=cache, position_ids=positions, use_cache=True).logits
        nll[:, t] = _nll(logits, ids[:, t + 1 : t + 2])[:, 0]
    return nll
