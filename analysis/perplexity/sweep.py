"""A perplexity sweep: every job over the same windows, summarised as ``perplexity.json`` holds it."""

from __future__ import annotations

import torch
from torch import Tensor

from analysis.compress import in_registry_order
from analysis.jobs.basis import cache_bytes
from analysis.jobs.job import Job
from analysis.models.loading import LoadedModel
from analysis.perplexity.runner import run_jobs
from analysis.perplexity.windows import Windows, summarise
from analysis.runtime.batching import Batching


def jobs_settings(jobs: list[Job]) -> dict:
    """The settings a result records about its jobs: the options asked for, plan, methods, budgets."""
    options = jobs[0].options
    plan = next((job.plan for job in jobs if job.plan is not None), None)
    return {"sinks": options.sinks, "recent": options.recent, "seed": options.seed,
            "plan": plan.name if plan is not None else None,
            "methods": in_registry_order(job.method for job in jobs),
            "budgets": list(dict.fromkeys(job.budget for job in jobs if job.budget is not None))}


def job_bytes(job: Job, summary: dict, window: int, element_size: int) -> int:
    """Logical bytes of one sequence's cache under ``job`` at the end of a window (as ``CompressedCache.memory``)."""
    L, H = summary["num_layers"], summary["num_kv_heads"]
    if job.plan is not None:
        held = torch.tensor(job.plan.budgets).clamp(max=window)  # (L, H)
    else:
        held = torch.full((L, H), min(job.budget or window, window))
    return cache_bytes(held, summary["head_dim"], element_size, job.lowrank)


def run_sweep(loaded: LoadedModel, windows: Windows, jobs: list[Job], *, source: dict, tokens: int, documents: int,
              batching: Batching | None = None, on_job=None) -> tuple[dict, dict[str, Tensor]]:
    """Evaluate every job on ``windows``: (summary for perplexity.json, NLL per run).

    ``source`` is ``load_documents``' keyword arguments; ``on_job`` is told the job keys first.
    """
    batching = batching or Batching()
    corpus = source.get("corpus", "text")
    if on_job is not None:
        on_job(", ".join(job.key for job in jobs))
    nll, seconds = run_jobs(loaded.model, windows, jobs, batching)
    results, tensors = [], {}
    for job in jobs:
        result = summarise(windows, nll[job.key], job.method, job.label_budget(windows.size), seconds[job.key])
        if job.plan is not None:
            result |= {"plan": job.plan.name, "total_slots": job.plan.total_slots}
        result["bytes"] = job_bytes(job, loaded.summary(), windows.size, next(loaded.model.parameters()).element_size())
        if job.lowrank is not None:
            result |= {"lowrank": job.lowrank.tag} | job.lowrank.describe()
        name = f"{job.method}@{result['budget']}" + (f"+{job.lowrank.tag}" if job.lowrank else "")
        tensors[name] = result.pop("nll").to(torch.float32).contiguous()
        results.append(result | {"corpus": corpus})
    settings = jobs_settings(jobs)
    summary = {
        "model": loaded.model_id, "source": source, "tokens": tokens, "documents": documents,
        "window": windows.size, "stride": windows.size // 2, "windows": len(windows.docs),
        "sinks": settings["sinks"], "recent": settings["recent"], "seed": settings["seed"],
        "batch_size": batching.batch_size, "processes": batching.world, "device": str(loaded.device),
        "text_ids": list(dict.fromkeys(windows.docs)), "plan": settings["plan"],
        "methods": settings["methods"], "budgets": settings["budgets"], "results": results,
    }
    return summary, tensors
