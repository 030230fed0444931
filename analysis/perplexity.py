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
fewer windows than the batch size (``analysis.sweep``): each row is compressed by its own policy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from analysis.cache import CompressedCache
from analysis.compress import Policy, make_policy
from analysis.errors import UserError


@dataclass
class Windows:
    ids: Tensor  # (N, W) int64
    docs: list[str]  # document id of each window
    starts: list[int]  # first token's index in its document
    scored_from: list[int]  # first scored target index inside the window

    @property
    def size(self) -> int:
        return self.ids.shape[1]


def make_windows(sequences: list[tuple[str, list[int]]], window: int) -> Windows:
    """Cut each (doc id, token ids) sequence into half-overlapping windows of ``window`` tokens.

    When ``len - window`` is not a multiple of the stride, a last window ends at the document's
    end and scores only the targets after the previous window's last one.
    """
    if window < 4 or window % 2:
        raise UserError(f"--window must be an even number of at least 4 tokens, got {window}")
    stride = window // 2
    rows, docs, starts, scored = [], [], [], []
    for doc, ids in sequences:
        if len(ids) < window:
            raise UserError(f"--window {window} is longer than the {len(ids)} tokens of {doc}")
        first = list(range(0, len(ids) - window + 1, stride))
        marks = [1] + [stride] * (len(first) - 1)
        covered = first[-1] + window  # targets up to here are scored
        if covered < len(ids):
            first.append(len(ids) - window)
            marks.append(covered - (len(ids) - window))
        for start, mark in zip(first, marks):
            rows.append(ids[start : start + window])
            docs.append(doc)
            starts.append(start)
            scored.append(mark)
    return Windows(torch.tensor(rows, dtype=torch.long), docs, starts, scored)


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(b, q, V), (b, q) -> (b, q) negative log-likelihood in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None])[..., 0]


def default_chunk(rows: int) -> int:
    return max(8, 4096 // rows)  # bounds the (rows, chunk, vocab) logits of a prefill chunk


@torch.inference_mode()
def window_nll(model, ids: Tensor, method: str, budget: int | None, sinks: int = 4,
               recent: int | None = None, seed: int = 0, chunk: int | None = None,
               window_ids: list[int] | None = None, plan=None) -> Tensor:
    """NLL (b, W-1) of each next token in each window row of ``ids`` (b, W), decoded under ``method``.

    Token t's prediction sees tokens <= t through a cache compressed to ``budget`` slots per layer
    (or to a plan's per-head budgets). ``window_ids`` (b,) seed randomised methods per window.
    """
    policy = make_policy(method, budget if plan is None else plan.max_budget, sinks=sinks,
                         recent=recent if plan is None else plan.recent, seed=seed)
    uncompressed = ids.shape[1] - 1 if method == "full" else min(plan.min_budget if plan else budget, ids.shape[1] - 1)
    return decode_rows(model, ids, policy, uncompressed, chunk, window_ids, plan=plan)


def decode_rows(model, ids: Tensor, policy: Policy, uncompressed: int, chunk: int | None = None,
                window_ids: list[int] | None = None, plan=None, row_budgets: list[int] | None = None) -> Tensor:
    """Teacher-forced NLL (b, W-1) of ``ids`` (b, W) through one CompressedCache under ``policy``.

    The first ``uncompressed`` tokens (where no row can overflow its budget) go in chunks.
    """
    b, W = ids.shape
    device = next(model.parameters()).device
    row_ids = torch.tensor(window_ids if window_ids is not None else range(b))
    with torch.inference_mode(), CompressedCache(model, policy=policy, plan=plan, row_ids=row_ids,
                                                 row_budgets=row_budgets) as cache:
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


def _decode_windows(model, ids: Tensor, cache, budget: int | None, method: str, chunk: int) -> Tensor:
    """Decode ``ids`` through an existing cache (kept for callers that build their own cache)."""
    uncompressed = ids.shape[1] - 1 if budget is None or method == "full" else min(budget, ids.shape[1] - 1)
    return _decode(model, ids, cache, uncompressed, chunk)


def scored_mask(windows: Windows) -> Tensor:
    """(N, W-1) bool: which predictions count (target index >= scored_from)."""
    target = torch.arange(1, windows.size)  # target index of prediction column c is c + 1
    return target[None, :] >= torch.tensor(windows.scored_from)[:, None]


def scored_streams(windows: Windows, nll: Tensor) -> dict[str, Tensor]:
    """Each document's scored NLLs in token order: every target from the second token on, once."""
    mask = scored_mask(windows)
    per_doc: dict[str, list[Tensor]] = {}
    for row, doc in enumerate(windows.docs):  # rows are in document order already
        per_doc.setdefault(doc, []).append(nll[row][mask[row]])
    return {doc: torch.cat(parts) for doc, parts in per_doc.items()}


def running_log_ppl(windows: Windows, nll: Tensor, points: int = 400) -> list[float]:
    """Running mean NLL (log-perplexity) against token position, averaged over documents (Fig. 4)."""
    streams = list(scored_streams(windows, nll).values())
    length = min(len(s) for s in streams)
    curves = torch.stack([s[:length].double().cumsum(0) / torch.arange(1, length + 1) for s in streams])
    mean = curves.mean(0)  # (length,)
    step = max(1, length // points)
    return [round(float(v), 5) for v in mean[step - 1 :: step]]


def summarise(windows: Windows, nll: Tensor, method: str, budget: int, seconds: float) -> dict:
    """One run's entry in perplexity.json (``nll`` (N, W-1) is returned too, for the tensors file)."""
    scored = nll[scored_mask(windows)]
    return {
        "method": method,
        "budget": budget,
        "ppl": math.exp(float(scored.double().mean())),
        "tokens": int(scored.numel()),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(nll.numel() / seconds, 2) if seconds else None,
        "per_document_ppl": {doc: round(math.exp(float(s.double().mean())), 4)
                             for doc, s in scored_streams(windows, nll).items()},
        "running_log_ppl": running_log_ppl(windows, nll),
        "nll": nll,
    }


def evaluate(model, windows: Windows, method: str, budget: int | None, batch_size: int = 32,
             partial: Path | None = None, progress=None, plan=None, **policy_kwargs) -> dict:
    """Perplexity of one ``method`` at ``budget`` (or ``plan``) over all windows; resumable through ``partial``."""
    from analysis.sweep import Job, run_jobs

    job = Job(method, budget if method != "full" else None, plan)
    job.validate(windows.size, policy_kwargs.get("sinks", 4), policy_kwargs.get("recent"))
    nll, seconds = run_jobs(model, windows, [job], batch_size=batch_size, partial=partial, progress=progress,
                            **policy_kwargs)
    return summarise(windows, nll[job.key], method, job.label_budget(windows.size), seconds[job.key])


def load_partial_settings(partial: Path, settings: dict, ignore: tuple[str, ...] = (), write: bool = True) -> None:
    """Create ``partial`` for these settings, or check an existing one was made with the same.

    Keys in ``ignore`` are recorded but may differ on resume (results are stored per window).
    """
    partial.mkdir(parents=True, exist_ok=True)
    path = partial / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(settings) | set(before) if k not in ignore and before.get(k) != settings.get(k))
        if changed:
            raise UserError(f"{partial} holds an unfinished run with other settings ({', '.join(changed)}); "
                            "pass --overwrite to start again")
    elif write:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        tmp.replace(path)
