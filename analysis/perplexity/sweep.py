"""TODO docstring (from analysis.perplexity.jobs)"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from analysis.compress import METHODS
from analysis.perplexity.jobs import run_jobs, sweep_jobs
from analysis.perplexity.windows import Windows, summarise


def run_sweep(loaded, windows: Windows, methods: list[str], budgets: list[int], *, source: dict, tokens: int,
              documents: int, sinks: int = 4, recent: int | None = None, seed: int = 0, batch_size: int = 32,
              partial: Path | None = None, progress=None, on_job=None, plan=None, rank: int = 0,
              world: int = 1) -> tuple[dict, dict[str, Tensor]]:
    """Evaluate every job of the sweep on ``windows``: (summary for perplexity.json, NLL per run).

    ``progress(n)`` is called with each finished batch's unit count (total: jobs x windows / world);
    ``source`` is ``load_documents``' keyword arguments.
    """

    corpus = source.get("corpus", "text")
    jobs = sweep_jobs(methods, budgets, windows.size, sinks, recent, plan)
    if on_job is not None:
        on_job(", ".join(job.key for job in jobs))
    nll, seconds = run_jobs(loaded.model, windows, jobs, batch_size=batch_size, partial=partial, progress=progress,
                            sinks=sinks, recent=recent, seed=seed, rank=rank, world=world)
    results, tensors = [], {}
    for job in jobs:
        result = summarise(windows, nll[job.key], job.method, job.label_budget(windows.size), seconds[job.key])
        if job.plan is not None:
            result |= {"plan": job.plan.name, "total_slots": job.plan.total_slots}
        tensors[f"{job.method}@{result['budget']}"] = result.pop("nll").to(torch.float32).contiguous()
        results.append(result | {"corpus": corpus})
    summary = {
        "model": loaded.model_id, "source": source, "tokens": tokens, "documents": documents,
        "window": windows.size, "stride": windows.size // 2, "windows": len(windows.docs), "sinks": sinks,
        "recent": recent, "seed": seed, "batch_size": batch_size, "processes": world, "device": str(loaded.device),
        "text_ids": list(dict.fromkeys(windows.docs)), "plan": plan.name if plan is not None else None,
        "methods": [m for m in METHODS if m in methods], "budgets": budgets, "results": results,
    }
    return summary, tensors
