"""A perplexity sweep's settings from option values: the command (``experiments.perplexity``) and the
Perplexity page both build them here, so a form field fails with the same one line as its option.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from analysis.compress import MERGE_VS_EVICT, PolicyOptions, method_names
from analysis.errors import UserError
from analysis.jobs.basis import LowRank, slot_bytes, slots_for_bytes
from analysis.jobs.job import Job, make_jobs
from analysis.jobs.plan import Plan
from analysis.options import parse_ints, parse_names
from analysis.runtime.batching import check_batch_size

SWEEP_METHODS = ",".join(method_names(compressing=True, in_paper=True))  # the paper's methods
STREAM_METHODS = ",".join(MERGE_VS_EVICT)  # Fig. 4: WeightedKV against its eviction ablation


@dataclass(frozen=True)
class SweepSettings:
    methods: list[str]
    budgets: list[int]  # empty when a plan gives the budgets
    plan: Plan | None
    jobs: list[Job]  # every (method, budget) run, validated
    options: PolicyOptions = PolicyOptions()
    window: int | None = None

    def at_budgets(self, budgets: list[int]) -> "SweepSettings":
        """The same methods and options at ``budgets`` (``--bytes``: the slots the bytes buy, known once the
        model's head dimension is), validated as ``sweep_settings`` validates them."""
        if self.plan is not None:
            raise UserError("--bytes replaces --budget; a --plan gives its own budgets")
        jobs = make_jobs(self.methods, list(budgets), self.options, None, window=self.window)
        return replace(self, budgets=list(budgets), jobs=jobs)


def plan_and_budgets(budget: str | list[int] | None, plan_file: str | None = None,
                     total_budget: int | None = None) -> tuple[Plan | None, list[int]]:
    """--plan FILE (checked against --total-budget) replaces --budget (a comma list, or the ints): (plan, budgets)."""
    if plan_file:
        plan = Plan.load(plan_file)
        plan.check_total(total_budget)
        return plan, []
    if total_budget is not None:
        raise UserError("--total-budget limits a --plan: give one")
    return None, list(budget) if isinstance(budget, (list, tuple)) else parse_ints(budget, "budget")


def parse_methods(methods: str | list[str] | None, default: str) -> list[str]:
    """--methods (a comma list, or a page's chosen list); None or '': ``default``. At least one is required."""
    names = parse_names(default if methods in (None, "") else methods)
    if not names:
        raise UserError("--methods: choose at least one method")
    return names


def sweep_settings(methods: str | list[str] | None, budget: str | list[int] | None, tokens: int, window: int, *,
                   sinks: int = 4, recent: int | None = None, seed: int = 0, plan_file: str | None = None,
                   total_budget: int | None = None, batch_size: int = 32) -> SweepSettings:
    """A windowed sweep's settings, every check that needs no model done: bad values fail before any work."""
    names = parse_methods(methods, SWEEP_METHODS)
    plan, budgets = plan_and_budgets(budget, plan_file, total_budget)
    options = PolicyOptions(sinks, recent, seed)
    jobs = make_jobs(names, budgets, options, plan, window=window)
    if tokens < window:
        raise UserError(f"--tokens {tokens} is shorter than --window {window}")
    check_batch_size(batch_size)
    return SweepSettings(names, budgets, plan, jobs, options, window)


def lowrank_options(key_basis: str | None, key_rank: int | None = None, key_energy: float | None = None,
                    value_rank: int | None = None) -> LowRank | None:
    """--key-basis DIR with --key-rank R (or --key-energy E) and/or --value-rank R: the cache's ``LowRank``."""
    if key_basis is not None and key_rank is None and key_energy is None and value_rank is None:
        raise UserError("--key-basis needs --key-rank R, --key-energy E or --value-rank R")
    return LowRank.of(key_basis, key_rank, key_energy, value_rank)


def with_lowrank(jobs: list[Job], lowrank: LowRank | None) -> list[Job]:
    """Every job with its keys (and values) held in low rank; the jobs unchanged when ``lowrank`` is None."""
    return jobs if lowrank is None else [replace(job, lowrank=lowrank) for job in jobs]


def bytes_budget(budget_bytes: float, head_dim: int, element_size: int, lowrank: LowRank | None = None,
                 sinks: int = 4) -> int:
    """--bytes B per (layer, KV head) -> slots m: B / (2 d dtype) with full keys, B / ((r + d) dtype) with rank r
    (per-head ranks: their mean), values likewise."""
    widths = [None, None]
    if lowrank is not None:
        for i, kind in enumerate(("key_pre_rope", "value")):
            ranks = lowrank.ranks(kind)
            widths[i] = None if ranks is None else float(ranks.float().mean())
    return slots_for_bytes(budget_bytes, slot_bytes(head_dim, element_size, *widths), sinks)
