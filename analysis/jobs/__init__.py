"""What a run is, before it runs: a configured ``Job`` (a policy at a budget, or under a per-head ``Plan``,
with keys and values optionally held in a low-rank ``basis``). Commands and pages build jobs from what the
user typed (``make_jobs``); the runtime and every study below them take these objects, never names.
"""

from analysis.jobs.basis import Basis, LowRank
from analysis.jobs.job import Job, make_jobs
from analysis.jobs.plan import Plan

__all__ = ["Basis", "Job", "LowRank", "Plan", "make_jobs"]
