"""KV-cache compression methods behind one contract (``LayerState`` + ``Policy``), and their registry.

Adding a method is one file with a ``Policy`` subclass and one line in ``METHODS``. Every list of
methods anywhere (Table I's rows, a command's defaults, a page's choices) is drawn from ``METHODS``
by capability (``method_names``), never written out again. ``make_policy`` is the one place a
method name becomes a ``Policy``; ``analysis.jobs`` configures runs of them (budget, plan, low rank).
"""

from __future__ import annotations

from analysis.compress.base import LayerState, Policy
from analysis.compress.cam import CaM
from analysis.compress.full import Full
from analysis.compress.h2o import H2O
from analysis.compress.random_policy import RandomPolicy
from analysis.compress.registry import (
    MERGE_VS_EVICT,
    METHODS,
    PRESETS,
    PolicyOptions,
    compresses,
    eviction_ablation,
    in_registry_order,
    make_policy,
    method_names,
    policy_class,
)
from analysis.compress.rows import RowPolicies
from analysis.compress.streaming_llm import StreamingLLM
from analysis.compress.tova import TOVA
from analysis.compress.weightedkv import WeightedKV
from analysis.compress.weightedkv_evict import WeightedKVEvict

__all__ = ["CaM", "Full", "H2O", "LayerState", "MERGE_VS_EVICT", "METHODS", "Policy", "PolicyOptions",
           "PRESETS", "RandomPolicy", "RowPolicies", "StreamingLLM", "TOVA", "WeightedKV", "WeightedKVEvict",
           "compresses", "eviction_ablation", "in_registry_order", "make_policy", "method_names",
           "policy_class"]
