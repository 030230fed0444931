"""Perplexity over one long stream per document (the paper's Fig. 4): no windows, no restarts.

Each document's first T tokens are one sequence decoded token by token through one
``CompressedCache`` from an empty cache to the end, so the cache at token t has compressed
everything before it. A stream is a single "window" of T tokens with no stride that scores every
target from the second token on, so the sweep machinery runs it unchanged (``analysis.perplexity.runner``):
documents are batch rows, several methods share a batch (each row under its own policy), and a
killed run resumes per (method, document) from the partial directory. Positions are the original
ones (0..T-1), so T is limited by the model's positions.

Sliding-window layers (Gemma 2/3) keep the model's own sliding cache (``CompressedCache``): the
budget holds only the full-attention layers, so on Gemma 3 a stream longer than the window is also
bounded in the sliding layers by the model's design, whatever the method.

Statistics: per document, the mean NLL over its T - 1 targets and its perplexity; per method, the
perplexity of all targets pooled, and the running log-perplexity curve (mean NLL of targets 1..t)
averaged over documents with its population standard deviation across documents (the spread).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from analysis.errors import UserError
from analysis.jobs.job import Job
from analysis.models.loading import LoadedModel
from analysis.ops import running_mean
from analysis.perplexity.runner import run_jobs
from analysis.perplexity.sweep import job_bytes, jobs_settings
from analysis.perplexity.windows import Windows
from analysis.runtime.batching import Batching

POINTS = 400  # points kept of each running curve


def check_stream_length(tokens: int, max_positions: int | None) -> None:
    """A stream uses the original positions 0..T-1: T must fit the model's position range."""
    if tokens < 4:
        raise UserError(f"--tokens must be at least 4 for a stream, got {tokens}")
    if max_positions and tokens > max_positions:
        raise UserError(f"a stream of {tokens} tokens is longer than the model's {max_positions} positions; "
                        f"use --tokens {max_positions} or fewer")


def stream_windows(sequences: list[tuple[str, list[int]]]) -> Windows:
    """One window per document covering all of it; every target from the second token is scored."""
    lengths = {len(ids) for _, ids in sequences}
    if len(lengths) != 1:
        raise UserError(f"stream documents must have the same length, got {sorted(lengths)}")
    ids = torch.tensor([ids for _, ids in sequences], dtype=torch.long)  # (N, T)
    return Windows(ids, [doc for doc, _ in sequences], [0] * len(sequences), [1] * len(sequences))


def running_curve(nll: Tensor, points: int = POINTS) -> dict:
    """Running mean NLL of each document (N, T-1) -> mean and spread across documents at ~``points`` targets."""
    targets = nll.shape[1]
    curves = running_mean(nll)  # (N, T-1)
    step = max(1, targets // points)
    index = torch.arange(step - 1, targets, step)
    if int(index[-1]) != targets - 1:  # always end on the last target
        index = torch.cat([index, torch.tensor([targets - 1])])
    mean, spread = curves.mean(0), curves.std(0, correction=0)
    return {"token": [int(i) + 1 for i in index],  # target index = token position predicted
            "mean": [round(float(mean[i]), 5) for i in index],
            "spread": [round(float(spread[i]), 5) for i in index]}


def summarise_stream(windows: Windows, jobs, nll: dict[str, Tensor], seconds: dict[str, float]) -> dict:
    """The ``results`` of stream.json: one entry per (method, budget)."""
    results = []
    for job in jobs:
        rows = nll[job.key]  # (N, T-1)
        per_doc = rows.double().mean(1)  # (N,)
        results.append({
            "method": job.method,
            "budget": job.label_budget(windows.size),
            "key": job.key,
            "ppl": math.exp(float(rows.double().mean())),
            "nll_mean": round(float(rows.double().mean()), 6),
            "nll_spread": round(float(per_doc.std(correction=0)), 6),
            "per_document_nll": {doc: round(float(v), 6) for doc, v in zip(windows.docs, per_doc)},
            "per_document_ppl": {doc: round(math.exp(float(v)), 4) for doc, v in zip(windows.docs, per_doc)},
            "tokens": int(rows.numel()),
            "seconds": round(seconds[job.key], 3),
            "running_log_ppl": running_curve(rows),
        })
    return {"results": results}


def run_stream(loaded: LoadedModel, sequences: list[tuple[str, list[int]]], jobs: list[Job], *, source: dict,
               batching: Batching | None = None) -> tuple[dict, dict[str, Tensor]]:
    """Everything stream.json and nll.safetensors hold: (summary, NLL (N, T-1) per "method@budget")."""
    windows = stream_windows(sequences)
    check_stream_length(windows.size, loaded.summary().get("max_positions"))
    for job in jobs:
        job.check_window(windows.size)
    nll, seconds = run_jobs(loaded.model, windows, jobs, batching)
    settings = jobs_settings(jobs)
    summary = {"model": loaded.model_id, "source": source, "tokens": windows.size, "documents": len(windows.docs),
               "text_ids": list(windows.docs), "sinks": settings["sinks"], "recent": settings["recent"],
               "seed": settings["seed"], "plan": settings["plan"], "device": str(loaded.device),
               "methods": settings["methods"], "budgets": settings["budgets"],
               "spread": "population standard deviation across documents"}
    summary |= summarise_stream(windows, jobs, nll, seconds)
    size = next(loaded.model.parameters()).element_size()
    for r, job in zip(summary["results"], jobs):
        r["bytes"] = job_bytes(job, loaded.summary(), windows.size, size)
    suffix = lambda job: f"+{job.lowrank.tag}" if job.lowrank else ""  # noqa: E731
    tensors = {f"{r['method']}@{r['budget']}{suffix(job)}": nll[job.key].to(torch.float32).contiguous()
               for r, job in zip(summary["results"], jobs)}
    return summary, tensors
