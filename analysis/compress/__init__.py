"""KV-cache compression methods behind one contract (``LayerState`` + ``Policy``).

Adding a method is one file with a ``Policy`` subclass and one line in ``METHODS``.
"""

from __future__ import annotations

import dataclasses

from analysis.compress.base import LayerState, Policy
from analysis.compress.cam import CaM
from analysis.compress.full import Full
from analysis.compress.h2o import H2O
from analysis.compress.random_policy import RandomPolicy
from analysis.compress.rows import RowPolicies
from analysis.compress.streaming_llm import StreamingLLM
from analysis.compress.tova import TOVA
from analysis.compress.weightedkv import WeightedKV
from analysis.compress.weightedkv_evict import WeightedKVEvict
from analysis.errors import UserError

METHODS: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (Full, StreamingLLM, H2O, TOVA, CaM, WeightedKV, WeightedKVEvict, RandomPolicy)
}


def make_policy(
    method: str, budget: int | None, sinks: int = 4, recent: int | None = None, seed: int = 0
) -> Policy:
    """Build the policy registered as ``method``; ``seed`` goes to the randomised ones only."""
    if method not in METHODS:
        raise UserError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
    cls = METHODS[method]
    kwargs = {"budget": budget, "sinks": sinks, "recent": recent}
    if "seed" in {f.name for f in dataclasses.fields(cls)}:
        kwargs["seed"] = seed
    return cls(**kwargs)


__all__ = ["METHODS", "LayerState", "Policy", "RowPolicies", "UserError", "make_policy"]
