"""WeightedKV's "Eviction" ablation: the same selection, no merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from analysis.compress.merging import MergeSpec
from analysis.compress.weightedkv import WeightedKV


@dataclass
class WeightedKVEvict(WeightedKV):
    """Evict the candidate with the lowest average attention ā = a / n; k_j and v_j both go.

    Identical to ``WeightedKV`` (per KV head, ā temporary, same sinks/recent split) except that
    nothing is merged: effectively H2O with an average instead of a sum. The point ``target=none``
    of the merge space, and the eviction ablation of every point that selects by average attention.

    Reference: WeightedKV (arXiv:2503.01330) §V-B, Fig. 4 "Eviction".
    """

    name: ClassVar[str] = "weightedkv_evict"
    spec: ClassVar[MergeSpec] = MergeSpec(target="none")
    merges: ClassVar[bool] = False
