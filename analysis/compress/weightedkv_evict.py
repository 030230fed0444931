"""WeightedKV's "Eviction" ablation: the same selection, no merge."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from analysis.compress.base import LayerState
from analysis.compress.weightedkv import WeightedKV


@dataclass
class WeightedKVEvict(WeightedKV):
    """Evict the candidate with the lowest average attention ā = a / n; k_j and v_j both go.

    Identical to ``WeightedKV`` (per KV head, ā temporary, same sinks/recent split) except that
    nothing is merged: effectively H2O with an average instead of a sum.

    Reference: WeightedKV (arXiv:2503.01330) §V-B, Fig. 4 "Eviction".
    """

    name: ClassVar[str] = "weightedkv_evict"
    merges: ClassVar[bool] = False

    def merge(self, state: LayerState, victim: Tensor, active: Tensor) -> None:
        """Eviction: nothing to fold in."""
