"""Configured runs: a method name turned into a ``Policy`` once, at the edge, and carried as a ``Job``.

Commands and pages call ``make_jobs`` (or ``Job.of``) with what the user typed; everything below
them (the cache, the perplexity evaluator, the perturbation and head studies) takes ``Job`` or
``Policy`` objects and asks them for their capabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.compress import Policy, PolicyOptions, make_policy, policy_class
from analysis.errors import UserError
from analysis.jobs.basis import LowRank
from analysis.jobs.plan import Plan
from analysis.ops import uncompressed_prefix


@dataclass(frozen=True, eq=False)
class Job:
    """One configured run: a policy at one budget, or under a per-(layer, KV head) ``plan``.

    ``options`` are what the user asked for (``recent=None`` stays None), recorded with results;
    ``lowrank`` holds keys (and/or values) as low-rank coefficients (``analysis.jobs.basis``).
    """

    policy: Policy
    plan: Plan | None = None
    options: PolicyOptions = field(default_factory=PolicyOptions)
    lowrank: LowRank | None = None

    @classmethod
    def of(cls, method: str, budget: int | None = None, options: PolicyOptions | None = None,
           plan: Plan | None = None) -> "Job":
        options = options or PolicyOptions()
        if plan is not None:
            policy = make_policy(method, plan.max_budget, plan.sinks, plan.recent, options.seed)
            plan.check_policy(policy)
            return cls(policy, plan, options)
        return cls(make_policy(method, budget if policy_class(method).compresses else None, options.sinks,
                               options.recent, options.seed), None, options)

    def at_budget(self, budget: int) -> "Job":
        """The same method and options at another uniform budget (a study whose budget follows its data:
        one step's t - 1 slots); the options' ``recent=None`` splits the new budget as asked."""
        if self.plan is not None or self.lowrank is not None:
            raise UserError("at_budget re-budgets a uniform job without low-rank channels")
        return self if self.budget == budget else Job.of(self.method, budget, self.options)

    @property
    def method(self) -> str:
        return self.policy.name

    @property
    def compresses(self) -> bool:
        return self.policy.compresses

    @property
    def budget(self) -> int | None:
        """The uniform budget; None for the reference and for a plan (see ``plan``)."""
        return self.policy.budget if self.compresses and self.plan is None else None

    @property
    def key(self) -> str:
        channels = f"+{self.lowrank.tag}" if self.lowrank is not None else ""
        if self.plan is not None:
            return f"{self.method}@{self.plan.name}{channels}"
        return f"{self.method}@{self.budget or 'full'}{channels}"

    def label_budget(self, window: int) -> int:
        """The budget a table shows: a plan's mean slots per head, the window for the reference."""
        if self.plan is not None:
            return round(self.plan.total_slots / (self.plan.num_layers * self.plan.num_kv_heads))
        return self.budget if self.budget is not None else window

    def uncompressed(self, tokens: int) -> int:
        """How many of ``tokens`` teacher-forced tokens go through before any head can overflow.

        They can be fed in chunks (the same attention and statistics, fewer forwards): all but the
        last for the reference, else up to the smallest budget.
        """
        low = self.plan.min_budget if self.plan is not None else self.budget
        return uncompressed_prefix(tokens, [low if self.compresses else None])

    def check_window(self, window: int) -> None:
        top = self.plan.max_budget if self.plan is not None else self.budget
        if self.compresses and top is not None and top >= window:
            raise UserError(f"budget {top} >= window {window}: nothing is ever compressed, "
                            "which is the same as method 'full'")


def make_jobs(methods: list[str], budgets: list[int], options: PolicyOptions | None = None,
              plan: Plan | None = None, window: int | None = None) -> list[Job]:
    """The runs of a study, every one validated before any work.

    The reference (``full``) runs once, first; every other method once per budget, or once under
    ``plan`` when one is given. With ``window``, a budget that never compresses is refused.
    """
    options = options or PolicyOptions()
    reference = [m for m in methods if not policy_class(m).compresses]
    squeezed = [m for m in methods if policy_class(m).compresses]
    jobs = [Job.of(m, None, options) for m in reference]
    if plan is not None:
        jobs += [Job.of(m, None, options, plan) for m in squeezed]
    else:
        jobs += [Job.of(m, b, options) for m in squeezed for b in budgets]
    if window is not None:
        for job in jobs:
            job.check_window(window)
    return jobs
