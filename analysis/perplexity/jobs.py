"""A perplexity sweep: (method, budget) jobs over windows, packed into batches, resumable, shardable.

Work is cut into units, one (job, window) each, stored in the partial directory as soon as its
batch finishes (``{method}-{budget}/{window}.pt``), so a killed run resumes whatever the batch size,
and processes of a ``torchrun`` share the windows (rank r takes windows r, r + n, ...). Units of
jobs with the same budget share a batch, each row under its own policy (``RowPolicies``): a sweep
over one document's few windows then runs its methods side by side, not one after another.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from analysis.compress import RowPolicies, make_policy
from analysis.errors import UserError
from analysis.ops import uncompressed_prefix
from analysis.perplexity.decode import decode_rows, default_chunk
from analysis.perplexity.windows import Windows, summarise


def evaluate(model, windows: Windows, method: str, budget: int | None, batch_size: int = 32,
             partial: Path | None = None, progress=None, plan=None, **policy_kwargs) -> dict:
    """Perplexity of one ``method`` at ``budget`` (or ``plan``) over all windows; resumable through ``partial``."""
    pass  # (self-import removed)

    job = Job(method, budget if method != "full" else None, plan)
    job.validate(windows.size, policy_kwargs.get("sinks", 4), policy_kwargs.get("recent"))
    nll, seconds = run_jobs(model, windows, [job], batch_size=batch_size, partial=partial, progress=progress,
                            **policy_kwargs)
    return summarise(windows, nll[job.key], method, job.label_budget(windows.size), seconds[job.key])


@dataclass(frozen=True)
class Job:
    method: str
    budget: int | None  # None: full, or a plan
    plan: object = field(default=None, compare=False)  # a Plan (unhashable); ``key`` names it

    @property
    def key(self) -> str:
        return f"{self.method}@{self.plan.name}" if self.plan is not None else f"{self.method}@{self.budget or 'full'}"

    def label_budget(self, window: int) -> int:
        if self.plan is not None:
            return round(self.plan.total_slots / (self.plan.num_layers * self.plan.num_kv_heads))
        return self.budget if self.budget is not None else window

    def validate(self, window: int, sinks: int = 4, recent: int | None = None) -> None:
        if self.plan is not None:
            self.plan.check_policy(make_policy(self.method, self.plan.max_budget, self.plan.sinks, self.plan.recent))
            top = self.plan.max_budget
        else:
            make_policy(self.method, self.budget, sinks=sinks, recent=recent)
            top = self.budget
        if self.method != "full" and top is not None and top >= window:
            raise UserError(f"budget {top} >= window {window}: nothing is ever compressed, "
                            "which is the same as method 'full'")


def sweep_jobs(methods: list[str], budgets: list[int], window: int, sinks: int = 4,
               recent: int | None = None, plan=None) -> list[Job]:
    """The runs of a sweep, every one validated before any work.

    ``full`` runs once (budget None), first; every other method once per budget, or once with
    ``plan`` when one is given.
    """
    jobs = [Job(m, None) for m in methods if m == "full"]
    if plan is not None:
        jobs += [Job(m, None, plan) for m in methods if m != "full"]
    else:
        jobs += [Job(m, b) for m in methods if m != "full" for b in budgets]
    for job in jobs:
        job.validate(window, sinks, recent)
    return jobs


def _unit_path(partial: Path, job: Job, window: int) -> Path:
    return partial / job.key.replace("@", "-") / f"{window}.pt"


def _save(path: Path, nll: Tensor, seconds: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"nll": nll.clone(), "seconds": seconds}, tmp)
    tmp.replace(path)


def _batches(units: list[tuple[Job, int]], batch_size: int) -> list[list[tuple[Job, int]]]:
    """Pack units into batches: same budget together (same chunked prefill); plans and full alone."""
    groups: dict[tuple, list] = {}
    for job, w in units:
        shareable = job.plan is None and job.method != "full"
        groups.setdefault(("budget", job.budget) if shareable else ("job", job.key), []).append((job, w))
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def _decode_batch(model, windows: Windows, batch: list[tuple[Job, int]], sinks: int, recent: int | None,
                  seed: int) -> Tensor:
    ids = windows.ids[[w for _, w in batch]]
    window_ids = [w for _, w in batch]
    first = batch[0][0]
    jobs = list({job.key: job for job, _ in batch}.values())
    if len(jobs) == 1:
        policy = make_policy(first.method, first.plan.max_budget if first.plan else first.budget,
                             sinks=first.plan.sinks if first.plan else sinks,
                             recent=first.plan.recent if first.plan else recent, seed=seed)
        budget = None if first.method == "full" else first.plan.min_budget if first.plan else first.budget
        uncompressed = uncompressed_prefix(windows.size, [budget])
        return decode_rows(model, ids, policy, uncompressed, default_chunk(len(batch)), window_ids, plan=first.plan)
    policies = [make_policy(j.method, j.budget, sinks=sinks, recent=recent, seed=seed) for j in jobs]
    keys = [j.key for j in jobs]
    rows = RowPolicies(policies, [keys.index(job.key) for job, _ in batch])
    uncompressed = uncompressed_prefix(windows.size, [first.budget])  # a shared batch has one budget
    return decode_rows(model, ids, rows, uncompressed, default_chunk(len(batch)), window_ids,
                       row_budgets=[job.budget for job, _ in batch])


def run_jobs(model, windows: Windows, jobs: list[Job], batch_size: int = 32, partial: Path | None = None,
             progress=None, sinks: int = 4, recent: int | None = None, seed: int = 0, rank: int = 0,
             world: int = 1) -> tuple[dict[str, Tensor], dict[str, float]]:
    """NLL (N, W-1) and decode seconds per job key; this rank's windows only when ``world`` > 1."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
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
        nll = _decode_batch(model, windows, batch, sinks, recent, seed)
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
