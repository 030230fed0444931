"""Running jobs over windows: (job, window) units, packed into batches, resumable, shardable.

Work is cut into units, one (job, window) each, stored in the partial directory as soon as its
batch finishes (``{method}-{budget}/{window}.pt``), so a killed run resumes whatever the batch size,
and processes of a ``torchrun`` share the windows (rank r takes windows r, r + n, ...). Units of
jobs with the same budget share a batch, each row under its own policy (``RowPolicies``): a sweep
over one document's few windows then runs its methods side by side, not one after another. So do
jobs under per-head plans (a head study's plan and its baselines), each row under its own plan.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from analysis.compress import RowPolicies
from analysis.jobs.job import Job
from analysis.perplexity.windows import Windows, summarise
from analysis.runtime.batching import Batching, check_batch_size
from analysis.runtime.decode import decode_rows, default_chunk, vocab_size


def evaluate(model, windows: Windows, job: Job, batching: Batching | None = None) -> dict:
    """Perplexity of one job over all windows; resumable through ``batching.partial``."""
    job.check_window(windows.size)
    nll, seconds = run_jobs(model, windows, [job], batching)
    return summarise(windows, nll[job.key], job.method, job.label_budget(windows.size), seconds[job.key])


def _unit_path(partial: Path, job: Job, window: int) -> Path:
    return partial / job.key.replace("@", "-") / f"{window}.pt"


def _save(path: Path, nll: Tensor, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"nll": nll.clone(), "seconds": seconds}, tmp)
    tmp.replace(path)


def _group(job: Job) -> tuple:
    """Which jobs may share a batch: one budget's jobs; plans with the same sinks and recent; the reference alone."""
    if not job.compresses:
        return ("job", job.key)
    channels = (job.lowrank.tag, id(job.lowrank.basis)) if job.lowrank is not None else None  # one per cache
    if job.plan is not None:
        return ("plans", job.plan.sinks, job.plan.recent, channels)
    return ("budget", job.budget, channels)


def _batches(units: list[tuple[Job, int]], batch_size: int) -> list[list[tuple[Job, int]]]:
    """Pack units into batches by ``_group``, each row under its own job (``RowPolicies``)."""
    groups: dict[tuple, list] = {}
    for job, w in units:
        groups.setdefault(_group(job), []).append((job, w))
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _decode_batch(model, windows: Windows, batch: list[tuple[Job, int]]) -> Tensor:
    ids = windows.ids[[w for _, w in batch]]
    window_ids = [w for _, w in batch]
    first = batch[0][0]
    jobs = list({job.key: job for job, _ in batch}.values())
    chunk = default_chunk(len(batch), vocab_size(model))
    uncompressed = min(job.uncompressed(windows.size) for job in jobs)  # no row overflows while chunked
    if len(jobs) == 1:
        return decode_rows(model, ids, first.policy, uncompressed, chunk, window_ids, plan=first.plan,
                           lowrank=first.lowrank)
    keys = [j.key for j in jobs]
    rows = RowPolicies(policies=[j.policy for j in jobs], rows=[keys.index(job.key) for job, _ in batch])
    if first.plan is not None:  # a plan per row (head studies: a plan and its baselines side by side)
        return decode_rows(model, ids, rows, uncompressed, chunk, window_ids, row_plans=[job.plan for job, _ in batch],
                           lowrank=first.lowrank)
    return decode_rows(model, ids, rows, uncompressed, chunk, window_ids, row_budgets=[job.budget for job, _ in batch],
                       lowrank=first.lowrank)


def run_jobs(model, windows: Windows, jobs: list[Job],
             batching: Batching | None = None) -> tuple[dict[str, Tensor], dict[str, float]]:
    """NLL (N, W-1) and decode seconds per job key; this rank's windows only when ``batching.world`` > 1."""
    batching = batching or Batching()
    batch_size, partial, progress = batching.batch_size, batching.partial, batching.progress
    rank, world = batching.rank, batching.world
    check_batch_size(batch_size)
    mine = [w for w in range(len(windows.docs)) if w % world == rank]
    units = [(job, w) for job in jobs for w in mine]
    done: dict[tuple[str, int], dict] = {}
    for job, w in units:
        path = _unit_path(partial, job, w) if partial is not None else None
        if path is not None and path.is_file():
            done[job.key, w] = torch.load(path)
            if progress is not None:
                progress(1)
    todo = [(job, w) for job, w in units if (job.key, w) not in done]
    for batch in _batches(todo, batch_size):
        began = time.perf_counter()
        nll = _decode_batch(model, windows, batch)
        share = (time.perf_counter() - began) / len(batch)
        for row, (job, w) in enumerate(batch):
            done[job.key, w] = {"nll": nll[row], "seconds": share}
            if partial is not None:
                _save(_unit_path(partial, job, w), nll[row], share)
        if progress is not None:
            progress(len(batch))
    if world > 1:
        done = _gather(done)
    nll = {job.key: torch.stack([done[job.key, w]["nll"] for w in range(len(windows.docs))]) for job in jobs}
    seconds = {job.key: sum(done[job.key, w]["seconds"] for w in range(len(windows.docs))) for job in jobs}
    return nll, seconds


def _gather(done: dict) -> dict:
    """Every rank's units, merged on every rank (gloo on CPU, NCCL on CUDA; objects go via pickling)."""

    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, {k: {"nll": v["nll"].cpu(), "seconds": v["seconds"]} for k, v in done.items()})
    merged = {}
    for part in parts:
        merged.update(part)
    return merged
