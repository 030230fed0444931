"""WeightedKV: drop the key, merge the value into its right neighbour by average attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy
from analysis.ops import FAR, convex_merge


def right_neighbour(state: LayerState, victim: Tensor) -> Tensor:
    """(B, H) slot holding the next larger position than ``victim``'s in the same (row, head)."""
    pos = state.positions
    mine = pos.gather(2, victim[..., None])  # (B, H, 1)
    return torch.where(pos > mine, pos, FAR).argmin(dim=-1)  # free slots hold -1: never "to the right"


@dataclass
class WeightedKV(Policy):
    """Evict the candidate j with the lowest average attention ā = a / n, merging its value.

        v[n] <- (ā_j v_j + ā_n v_n) / (ā_j + ā_n),   n = right neighbour of j (next larger position)

    computed in float32 and cast back; where ā_j + ā_n = 0 the neighbour keeps its value.
    k_j, a_j and n_j are dropped (the slot is freed); the neighbour's key, a and n are untouched.
    ``compress`` removes one victim at a time in score order, so merges cascade (also after a long
    prompt). A state's ``merge_mask`` (from a plan) turns the merge off per head: evict instead.

    Interpretations of the paper's open points: scores and merges are per (batch row, KV head),
    on the GQA group-mean attention; ā is a temporary ("a = a/n" in Algorithm 1 read as a typo),
    ``a`` stays a running sum; the ``sinks`` first and ``recent`` newest positions are excluded from
    the argmin, and the rightmost candidate may merge into the oldest recent-window token; the
    defaults (4 sinks, ``budget // 2 - 4`` recent: 4 + 124 at m = 256, 4 + 508 at m = 1024) are
    shared with every scored baseline.

    Reference: Yuan et al., ICASSP 2025 (arXiv:2503.01330), Algorithm 1, §IV, Fig. 3.
    """

    name: ClassVar[str] = "weightedkv"
    stats: ClassVar[tuple[str, ...]] = ("acc", "count")
    merges: ClassVar[bool] = True

    def score(self, state: LayerState) -> Tensor:
        return state.average_attention()  # (B, H, C)

    def merge(self, state: LayerState, victim: Tensor, active: Tensor) -> None:
        if state.merge_mask is not None:
            active = active & state.merge_mask
        pair = torch.stack([victim, right_neighbour(state, victim)], dim=-1)  # (B, H, 2): j, n
        avg = state.average_attention().gather(2, pair)[..., None]  # (B, H, 2, 1): ā_j, ā_n
        for tensor in state.value_tensors():
            B, H, _, D = tensor.shape
            wide = pair[..., None].expand(B, H, 2, D)  # (B, H, 2, D)
            rows = tensor.gather(2, wide).float()  # (B, H, 2, D): v_j, v_n
            merged = convex_merge(avg[:, :, :1], rows[:, :, :1], avg[:, :, 1:], rows[:, :, 1:],
                                  active[..., None, None])  # (B, H, 1, D)
            tensor.scatter_(2, wide[:, :, 1:], merged.to(tensor.dtype))  # one slot, in place

    def merge_ranked(self, state: LayerState, victims: Tensor, active: Tensor) -> None:
        """A long prompt's merges: neighbours and weights once, then only two-row gathers per victim.

        Victim i (rank i) merges into the nearest slot to its right that is still there when its turn
        comes: the first position after it held by a survivor or by a victim of higher rank. Scores
        never change during the pass (merges leave the neighbour's statistics alone), so every
        neighbour and weight is known before the first merge; the values still flow in rank order.
        """
        B, H, R = victims.shape
        if state.merge_mask is not None:
            active = active & state.merge_mask[..., None]
        pos = state.positions  # (B, H, C)
        rank = torch.full_like(pos, R)  # survivors (and inactive victims) outrank every victim
        rank.scatter_(2, victims, torch.where(active, torch.arange(R, device=pos.device), R))
        mine = pos.gather(2, victims)  # (B, H, R)
        later = torch.arange(R, device=pos.device)[:, None]  # (R, 1)
        neighbour = torch.empty_like(victims)
        for lo in range(0, R, 256):  # (B, H, 256, C) at a time: bounded memory for long prompts
            hi = min(lo + 256, R)
            right = (pos[:, :, None, :] > mine[..., lo:hi, None]) & (rank[:, :, None, :] > later[lo:hi])
            neighbour[..., lo:hi] = torch.where(right, pos[:, :, None, :], FAR).argmin(dim=-1)
        avg = state.average_attention()
        a_j, a_n = avg.gather(2, victims)[..., None], avg.gather(2, neighbour)[..., None]  # (B, H, R, 1)
        on = active[..., None]  # (B, H, R, 1)
        for tensor in state.value_tensors():
            D = tensor.shape[-1]
            for i in range(R):
                j = victims[..., i, None, None].expand(B, H, 1, D)
                n = neighbour[..., i, None, None].expand(B, H, 1, D)
                v_j, v_n = tensor.gather(2, j).float(), tensor.gather(2, n).float()  # (B, H, 1, D)
                rank_i = slice(i, i + 1)
                merged = convex_merge(a_j[:, :, rank_i], v_j, a_n[:, :, rank_i], v_n, on[:, :, rank_i])
                tensor.scatter_(2, n, merged.to(tensor.dtype))
