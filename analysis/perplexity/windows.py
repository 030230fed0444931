"""Windows over documents and what is scored in them: the paper's Table I protocol.

The paper leaves details open; these are our choices, stated once here:
- each document's first N tokens are cut into windows of W tokens with stride W/2, plus one last
  window aligned to the end when the stride does not land there;
- inside a window, decoding starts from an empty cache and goes token by token through the cache
  (``analysis.runtime.decode``), at the window's own positions 0..W-1;
- the first window of a document scores every prediction, later windows only the targets no earlier
  window scored, so every token of the document from the second on is scored exactly once;
- randomised methods draw per window (seeded by the seed and the window's index), so a window's
  result does not depend on the batch it runs in.

``summarise`` turns a run's NLL rows into its perplexity.json entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from analysis.errors import UserError
from analysis.ops import running_mean


@dataclass
class Windows:
    ids: Tensor  # (N, W) int64
    docs: list[str]  # document id of each window
    starts: list[int]  # first token's index in its document
    scored_from: list[int]  # first scored target index inside the window

    @property
    def size(self) -> int:
        return self.ids.shape[1]


def make_windows(sequences: list[tuple[str, list[int]]], window: int, bos: int | None = None) -> Windows:
    """Cut each (doc id, token ids) sequence into half-overlapping windows of ``window`` tokens.

    When ``len - window`` is not a multiple of the stride, a last window ends at the document's
    end and scores only the targets after the previous window's last one. ``bos`` (the tokenizer's
    BOS id, ``analysis.text.corpora.bos_id``; Gemma needs it first): every later window's first
    token, never a scored target, is replaced by it, so each window starts as the model expects.
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
            row = ids[start : start + window]
            rows.append(row if bos is None or start == 0 else [bos] + row[1:])
            docs.append(doc)
            starts.append(start)
            scored.append(mark)
    return Windows(torch.tensor(rows, dtype=torch.long), docs, starts, scored)


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
    curves = running_mean(torch.stack([s[:length] for s in streams]))  # (documents, length)
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
