"""The decode engine: teacher-forced decoding of token rows through one ``CompressedCache``.

Every study that needs a model's predictions under compression decodes here: the perplexity
evaluator (its windows), retrieval (a prompt, then its answer: ``decode_into`` twice), the merge
space, the head studies, low-rank keys, end to end, the starter set and the figure pipeline. Each
row may have its own policy (``RowPolicies``), budget or per-head plan, and the cache is the same
object ``generate()`` uses (one policy implementation, no simulation).

- Positions are the rows' own (0..W-1), so W must fit the model's RoPE range.
- While no row's cache can overflow its budget, no method has anything to do, so those tokens go
  through the model in chunks (identical attention and statistics, fewer forwards); after that, one
  token per forward.
- Logits are T x vocabulary floats: prefill chunks are sized by the vocabulary (``default_chunk``),
  Gemma's 262k one included.
- Sliding-window layers (Gemma 2/3) keep the model's own sliding cache: the budget applies to the
  full-attention layers only (``analysis.runtime.cache``).
- ``window_ids`` seed randomised methods per row (a window's index), so a row's draws do not depend
  on the batch it runs in.

The perplexity protocol (windows, what is scored) is ``analysis.perplexity.windows``; packing jobs and
windows into batches, resumably, is ``analysis.perplexity.runner``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.compress import Policy
from analysis.jobs.job import Job
from analysis.runtime.cache import CompressedCache, Rows


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(b, q, V), (b, q) -> (b, q) negative log-likelihood in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None])[..., 0]


LOGIT_FLOATS = 4096 * 49152  # float32 logits a prefill chunk may hold (~800 MB): 4,096 token-rows of a 49k vocabulary


def default_chunk(rows: int, vocab: int | None = None) -> int:
    """Tokens per prefill chunk: bounds the (rows, chunk, vocab) logits (Gemma's 262k vocabulary: 5x fewer)."""
    return max(8, LOGIT_FLOATS // (rows * (vocab or 49152)))


def vocab_size(model) -> int | None:
    return getattr(model.config.get_text_config(), "vocab_size", None)


@torch.inference_mode()
def window_nll(model, ids: Tensor, job: Job, chunk: int | None = None, window_ids: list[int] | None = None) -> Tensor:
    """NLL (b, W-1) of each next token in each window row of ``ids`` (b, W), decoded under ``job``.

    Token t's prediction sees tokens <= t through a cache compressed to the job's budget slots per
    layer (or to its plan's per-head budgets). ``window_ids`` (b,) seed randomised methods per window.
    """
    return decode_rows(model, ids, job.policy, job.uncompressed(ids.shape[1]), chunk, window_ids, plan=job.plan,
                       lowrank=job.lowrank)


def decode_rows(model, ids: Tensor, policy: Policy, uncompressed: int, chunk: int | None = None,
                window_ids: list[int] | None = None, plan=None, row_budgets: list[int] | None = None,
                lowrank=None, track_mixing: int = 0, inspect=None, row_plans: list | None = None) -> Tensor:
    """Teacher-forced NLL (b, W-1) of ``ids`` (b, W) through one CompressedCache under ``policy``.

    The first ``uncompressed`` tokens (where no row can overflow its budget) go in chunks. Rows may
    each have their own budget (``row_budgets``) or per-head plan (``row_plans``). ``track_mixing`` is
    the cache's option; ``inspect(cache)`` is called once at the end, before it closes.
    """
    b, W = ids.shape
    device = next(model.parameters()).device
    row_ids = torch.tensor(window_ids if window_ids is not None else range(b))
    rows = Rows(ids=row_ids, budgets=row_budgets, plans=row_plans)
    with torch.inference_mode(), CompressedCache(model, policy, plan=plan, rows=rows, lowrank=lowrank,
                                                 track_mixing=track_mixing) as cache:
        chunk = chunk or default_chunk(b, vocab_size(model))
        nll = decode_into(model, ids.to(device), cache, uncompressed, chunk).cpu()
        if inspect is not None:
            inspect(cache)
        return nll


def decode_into(model, ids: Tensor, cache, uncompressed: int, chunk: int, start: int = 0,
                correct: Tensor | None = None) -> Tensor:
    """Feed ``ids`` (b, W)[:, start:W-1] through ``cache``, which already holds positions < ``start``.

    Tokens before ``uncompressed`` go in chunks of ``chunk``, the rest one per forward. Returns the
    NLL (b, W-1) of every next token (columns before ``start`` are not filled); ``correct`` (b, W-1)
    bool, if given, is set where the target was the argmax (greedy decoding would have produced it).
    A study that must look at the cache between two parts of a sequence (a retrieval prompt before its
    answer) calls this twice, the second time with ``start``.
    """
    b, W = ids.shape
    device = ids.device
    nll = torch.empty((b, W - 1), device=device)

    def score(logits: Tensor, lo: int, hi: int) -> None:
        targets = ids[:, lo + 1 : hi + 1]
        nll[:, lo:hi] = _nll(logits, targets)
        if correct is not None:
            correct[:, lo:hi] = (logits.argmax(-1) == targets).to(correct.device)

    for lo in range(start, uncompressed, chunk):
        hi = min(lo + chunk, uncompressed)
        positions = torch.arange(lo, hi, device=device).expand(b, -1)  # (b, q)
        score(model(ids[:, lo:hi], past_key_values=cache, position_ids=positions, use_cache=True).logits, lo, hi)
    for t in range(max(start, uncompressed), W - 1):
        positions = torch.full((b, 1), t, device=device)
        score(model(ids[:, t : t + 1], past_key_values=cache, position_ids=positions, use_cache=True).logits, t, t + 1)
    return nll
