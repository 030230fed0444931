"""The named methods, in the order every table and legend lists them, and the lists drawn from them."""

from __future__ import annotations

from analysis.compress.base import Policy
from analysis.compress.cam import CaM
from analysis.compress.full import Full
from analysis.compress.h2o import H2O
from analysis.compress.random_policy import RandomPolicy
from analysis.compress.streaming_llm import StreamingLLM
from analysis.compress.tova import TOVA
from analysis.compress.weightedkv import WeightedKV
from analysis.compress.weightedkv_evict import WeightedKVEvict
from analysis.errors import UserError

METHODS: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (Full, StreamingLLM, H2O, TOVA, CaM, WeightedKV, WeightedKVEvict, RandomPolicy)
}
# The comparison at the centre of the toolkit: the same victim, its value merged or dropped.
MERGE_VS_EVICT: tuple[str, str] = (WeightedKV.name, WeightedKVEvict.name)


def policy_class(method: str) -> type[Policy]:
    if method not in METHODS:
        raise UserError(f"unknown compression method {method!r}; valid: {', '.join(METHODS)}")
    return METHODS[method]


def compresses(method: str) -> bool:
    """Whether ``method`` ever shrinks the cache (every method but the ``full`` reference)."""
    return policy_class(method).compresses


def method_names(*, compressing: bool | None = None, in_paper: bool | None = None,
                 merging: bool | None = None) -> list[str]:
    """Registered names in registry order, filtered by capability (None: either)."""
    def keep(cls: type[Policy]) -> bool:
        return all(want is None or got == want for want, got in
                   ((compressing, cls.compresses), (in_paper, cls.in_paper), (merging, cls.merges)))
    return [name for name, cls in METHODS.items() if keep(cls)]
