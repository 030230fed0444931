"""WeightedKV: drop the key, merge the value into its right neighbour by average attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from analysis.compress.base import LayerState
from analysis.compress.merge_parts import RightNeighbour
from analysis.compress.merging import MergePolicy, MergeSpec


def right_neighbour(state: LayerState, victim: Tensor) -> Tensor:
    """(B, H) slot holding the next larger position than ``victim``'s in the same (row, head)."""
    return RightNeighbour().find(state, victim, None)[0][..., 0]


@dataclass
class WeightedKV(MergePolicy):
    """Evict the candidate j with the lowest average attention ā = a / n, merging its value.

        v[n] <- (ā_j v_j + ā_n v_n) / (ā_j + ā_n),   n = right neighbour of j (next larger position)

    computed in float32 and cast back; where ā_j + ā_n = 0 the neighbour keeps its value.
    k_j, a_j and n_j are dropped (the slot is freed); the neighbour's key, a and n are untouched.
    ``compress`` removes one victim at a time in score order, so merges cascade (also after a long
    prompt). A state's ``merge_mask`` (from a plan) turns the merge off per head: evict instead.

    The point ``target=right, weights=attention, what=value`` of the merge space
    (``analysis.compress.merging``).

    Interpretations of the paper's open points: scores and merges are per (batch row, KV head),
    on the GQA group-mean attention; ā is a temporary ("a = a/n" in Algorithm 1 read as a typo),
    ``a`` stays a running sum; the ``sinks`` first and ``recent`` newest positions are excluded from
    the argmin, and the rightmost candidate may merge into the oldest recent-window token; the
    defaults (4 sinks, ``budget // 2 - 4`` recent: 4 + 124 at m = 256, 4 + 508 at m = 1024) are
    shared with every scored baseline.

    Reference: Yuan et al., ICASSP 2025 (arXiv:2503.01330), Algorithm 1, §IV, Fig. 3.
    """

    name: ClassVar[str] = "weightedkv"
    spec: ClassVar[MergeSpec] = MergeSpec(target="right", weights="attention", what="value")
    stats: ClassVar[tuple[str, ...]] = ("acc", "count")
    merges: ClassVar[bool] = True
