"""Long-text perplexity under a compressed cache, with the paper's protocol (Table I, Fig. 4).

Protocol (the paper leaves details open; these are our choices, stated once here):
- each document's first N tokens are cut into windows of W tokens with stride W/2;
- inside a window, decoding starts from an empty cache and goes token by token through the same
  ``CompressedCache`` that ``generate()`` uses (one policy implementation, no simulation);
- the first window of a document scores every prediction, later windows only their last W/2
  targets, so every token of the document from the second on is scored exactly once;
- positions are the original ones inside the window (0..W-1), so W must fit the model's RoPE range.

Speed: while a window's cache is below the budget no method has anything to do, so those tokens go
through the model in chunks (identical attention and statistics, fewer forwards); after that, one
token per forward. Windows are batch rows, which is what makes CPU throughput scale.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from analysis.attention import grouped_attention
from analysis.cache import CompressedCache
from analysis.compress import make_policy
from analysis.errors import UserError


@dataclass
class Windows:
    ids: Tensor  # (N, W) int64
    docs: list[str]  # document id of each window
    starts: list[int]  # first token's index in its document
    scored_from: list[int]  # first scored target index inside the window (1 or W/2)

    @property
    def size(self) -> int:
        return self.ids.shape[1]


def make_windows(sequences: list[tuple[str, list[int]]], window: int) -> Windows:
    """Cut each (doc id, token ids) sequence into half-overlapping windows of ``window`` tokens."""
    if window < 4 or window % 2:
        raise UserError(f"--window must be an even number of at least 4 tokens, got {window}")
    stride = window // 2
    rows, docs, starts, scored = [], [], [], []
    for doc, ids in sequences:
        if len(ids) < window:
            raise UserError(f"--window {window} is longer than the {len(ids)} tokens of {doc}")
        for start in range(0, len(ids) - window + 1, stride):
            rows.append(ids[start : start + window])
            docs.append(doc)
            starts.append(start)
            scored.append(1 if start == 0 else stride)
    return Windows(torch.tensor(rows, dtype=torch.long), docs, starts, scored)


def _nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(b, q, V), (b, q) -> (b, q) negative log-likelihood in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets[..., None])[..., 0]


@torch.inference_mode()
def window_nll(model, ids: Tensor, method: str, budget: int | None, sinks: int = 4,
               recent: int | None = None, seed: int = 0, chunk: int | None = None) -> Tensor:
    """NLL (b, W-1) of each next token in each window row of ``ids`` (b, W), decoded under ``method``.

    Token t's prediction sees tokens <= t through a cache compressed to ``budget`` slots per layer.
    """
    b, W = ids.shape
    chunk = chunk or max(8, 4096 // b)  # bounds the (b, chunk, vocab) logits of a prefill chunk
    policy = make_policy(method, budget, sinks=sinks, recent=recent, seed=seed)
    cache = CompressedCache(model, policy=policy)  # switches an sdpa model to eager (with a warning)
    with grouped_attention(model):
        return _decode_windows(model, ids, cache, budget, method, chunk).cpu()


def _decode_windows(model, ids: Tensor, cache: CompressedCache, budget: int | None, method: str,
                    chunk: int) -> Tensor:
    b, W = ids.shape
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll = torch.empty((b, W - 1), device=device)
    # Below the budget nothing is compressed: feed those tokens in chunks.
    uncompressed = W - 1 if budget is None or method == "full" else min(budget, W - 1)
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


def evaluate(model, windows: Windows, method: str, budget: int | None, batch_size: int = 32,
             partial: Path | None = None, progress=None, **policy_kwargs) -> dict:
    """Perplexity of ``method`` at ``budget`` over all windows; resumable through ``partial``.

    Each finished batch of windows is saved in ``partial`` (a directory) and skipped on a rerun.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if budget is not None and method != "full" and budget >= windows.size:
        raise UserError(f"budget {budget} >= window {windows.size}: nothing is ever compressed, "
                        "which is the same as method 'full'")
    tag = f"{method}-{budget}"
    parts, seconds = [], 0.0
    for first in range(0, len(windows.docs), batch_size):
        saved = partial / f"{tag}-{first}.pt" if partial is not None else None
        if saved is not None and saved.is_file():
            done = torch.load(saved)
        else:
            began = time.perf_counter()
            nll = window_nll(model, windows.ids[first : first + batch_size], method, budget, **policy_kwargs)
            done = {"nll": nll, "seconds": time.perf_counter() - began}
            if saved is not None:
                tmp = saved.with_suffix(".tmp")
                torch.save(done, tmp)
                tmp.replace(saved)
        parts.append(done["nll"])
        seconds += done["seconds"]
        if progress is not None:
            progress(len(done["nll"]))
    nll = torch.cat(parts)
    scored = nll[scored_mask(windows)]
    return {
        "method": method,
        "budget": budget if budget is not None else windows.size,
        "ppl": math.exp(float(scored.double().mean())),
        "tokens": int(scored.numel()),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(nll.numel() / seconds, 2) if seconds else None,
        "per_document_ppl": {doc: round(math.exp(float(s.double().mean())), 4)
                             for doc, s in scored_streams(windows, nll).items()},
        "running_log_ppl": running_log_ppl(windows, nll),
        "nll": nll,
    }


def load_partial_settings(partial: Path, settings: dict) -> None:
    """Create ``partial`` for these settings, or check an existing one was made with the same."""
    partial.mkdir(parents=True, exist_ok=True)
    path = partial / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != settings:
            changed = sorted(k for k in settings if before.get(k) != settings[k])
            raise UserError(f"{partial} holds an unfinished run with other settings ({', '.join(changed)}); "
                            "pass --overwrite to start again")
    else:
        path.write_text(json.dumps(settings, indent=1))


def sweep_jobs(methods: list[str], budgets: list[int], window: int, sinks: int = 4,
               recent: int | None = None) -> list[tuple[str, int | None]]:
    """The (method, budget) runs of a sweep, every combination validated before any work.

    ``full`` runs once (budget None), first; every other method once per budget.
    """
    for method in methods:
        for budget in budgets:
            make_policy(method, budget, sinks=sinks, recent=recent)
    jobs = [(m, None) for m in methods if m == "full"] + [(m, b) for m in methods if m != "full" for b in budgets]
    for m, b in jobs:
        if b is not None and b >= window:
            raise UserError(f"budget {b} >= window {window}: nothing is ever compressed, "
                            "which is the same as method 'full'")
    return jobs


def run_sweep(loaded, windows: Windows, methods: list[str], budgets: list[int], *, source: dict, tokens: int,
              documents: int, sinks: int = 4, recent: int | None = None, seed: int = 0, batch_size: int = 32,
              partial: Path | None = None, progress=None, on_job=None) -> tuple[dict, dict[str, Tensor]]:
    """Evaluate every job of the sweep on ``windows``: (summary for perplexity.json, NLL per run).

    ``progress(n)`` is called with each finished batch's window count (total: jobs x windows),
    ``on_job(method, budget)`` before each run; ``source`` is ``load_documents``' keyword arguments.
    """
    from analysis.compress import METHODS

    corpus = source.get("corpus", "text")
    results, tensors = [], {}
    for method, budget in sweep_jobs(methods, budgets, windows.size, sinks, recent):
        if on_job is not None:
            on_job(method, budget)
        result = evaluate(loaded.model, windows, method, budget, batch_size=batch_size, partial=partial,
                          progress=progress, sinks=sinks, recent=recent, seed=seed)
        tensors[f"{method}@{result['budget']}"] = result.pop("nll").to(torch.float32).contiguous()
        results.append(result | {"corpus": corpus})
    summary = {
        "model": loaded.model_id, "source": source, "tokens": tokens, "documents": documents,
        "window": windows.size, "stride": windows.size // 2, "windows": len(windows.docs), "sinks": sinks,
        "recent": recent, "seed": seed, "device": str(loaded.device), "text_ids": list(dict.fromkeys(windows.docs)),
        "methods": [m for m in METHODS if m in methods], "budgets": budgets, "results": results,
    }
    return summary, tensors


def save_sweep(out: Path, summary: dict, tensors: dict[str, Tensor], overwrite: bool = False,
               png: bool = True) -> Path:
    """Write a sweep's directory atomically: perplexity.json, nll.safetensors, table.csv/md, figures."""
    from safetensors.torch import save_file

    from analysis.plots.export import write_figure
    from analysis.plots.perplexity import fig_ppl_vs_budget, fig_running_log_ppl, table_rows
    from analysis.runs import atomic_dir, write_json

    rows = table_rows(summary["results"])
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / "perplexity.json", summary)
        save_file(tensors, str(tmp / "nll.safetensors"))
        header = list(rows[0])
        (tmp / "table.csv").write_text("\n".join(",".join(str(r[h]) for h in header) for r in [dict(zip(header, header))] + rows) + "\n")
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
        (tmp / "table.md").write_text("\n".join(md) + "\n")
        write_figure(fig_ppl_vs_budget(summary), tmp, "ppl_vs_budget", png=png)
        write_figure(fig_running_log_ppl(summary), tmp, "running_log_ppl", png=png)
    return Path(out)
