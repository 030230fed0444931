"""WeightedKV: drop the key, merge the value into its right neighbour by average attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy


@dataclass
class WeightedKV(Policy):
    """Evict the candidate j with the lowest average attention ā = a / n, merging its value.

        v[j+1] <- (ā_j v_j + ā_{j+1} v_{j+1}) / (ā_j + ā_{j+1})

    computed in float32 and cast back; where ā_j + ā_{j+1} = 0 the neighbour keeps its value.
    k_j, a_j and n_j are dropped (``LayerState.remove``); the neighbour's key, a and n are untouched.
    ``compress`` removes one victim at a time, so merges cascade (also after a long prefill).

    Interpretations of the paper's open points: scores and merges are per (batch row, KV head),
    on the GQA group-mean attention; ā is a temporary ("a = a/n" in Algorithm 1 read as a typo),
    ``a`` stays a running sum; the ``sinks`` first and ``recent`` newest slots are excluded from
    the argmin, and the rightmost candidate may merge into the oldest recent-window token; the
    defaults (4 sinks, ``budget // 2 - 4`` recent: 4 + 124 at m = 256, 4 + 508 at m = 1024) are
    shared with every scored baseline.

    Reference: Yuan et al., ICASSP 2025 (arXiv:2503.01330), Algorithm 1, §IV, Fig. 3.
    """

    name: ClassVar[str] = "weightedkv"

    def score(self, state: LayerState) -> Tensor:
        return state.average_attention()  # (B, H, L)

    def merge(self, state: LayerState, victim: Tensor) -> None:
        B, H, L, D = state.values.shape
        pair = torch.stack([victim, victim + 1], dim=-1)  # (B, H, 2): j, j+1
        avg = state.average_attention().gather(2, pair)[..., None]  # (B, H, 2, 1): ā_j, ā_{j+1}
        total = avg.sum(2, keepdim=True)  # (B, H, 1, 1)
        wide = pair[..., None].expand(B, H, 2, D)  # (B, H, 2, D)
        rows = state.values.gather(2, wide).float()  # (B, H, 2, D): v_j, v_{j+1}
        mixed = (avg * rows).sum(2, keepdim=True) / total  # (B, H, 1, D)
        merged = torch.where(total > 0, mixed, rows[:, :, 1:])  # 0 / 0: v_{j+1} unchanged
        state.values.scatter_(2, wide[:, :, 1:], merged.to(state.values.dtype))  # in place: see LayerState
