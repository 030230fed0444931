"""TOVA: evict by the newest query's attention, one decision per layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from analysis.compress.base import LayerState, Policy


@dataclass
class TOVA(Policy):
    """Evict the candidate the newest query attends to least, averaged over heads.

    ``state.last`` is already the group mean per KV head; with equal GQA groups its mean over KV
    heads is the mean over all query heads, as the official ``attn[:, :, -1].mean(1)``. One victim
    per layer, gathered from every KV head. Interpretation: the official TOVA has no sinks and no
    recent window; here the shared ``sinks``/``recent`` defaults apply so comparisons isolate the
    score. Pass ``sinks=0, recent=0`` for the original (the newest slot is still never a victim,
    which the original could drop only if it got the lowest weight).

    Reference: Oren et al., 2024; WeightedKV (arXiv:2503.01330) §V-A.
    """

    name: ClassVar[str] = "tova"
    per_layer: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("last",)

    def score(self, state: LayerState) -> Tensor:
        return state.last.mean(dim=1, keepdim=True)  # (B, H, C) -> (B, 1, C)
