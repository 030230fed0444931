"""Today's WeightedKV, CaM and eviction merges (commit 2b88700), frozen as the oracle of the merge-space test.

The package now builds these methods from the merge parts (``analysis.compress.merging``); this file keeps
the code they replaced, unchanged but for the class names, so that a test can show the new ones give
bit-identical results. It is test-only: nothing in the library imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy
from analysis.compress.random_policy import row_ids
from analysis.compress.streaming_llm import StreamingLLM
from analysis.ops import FAR, convex_merge, uniform


def right_neighbour(state: LayerState, victim: Tensor) -> Tensor:
    """(B, H) slot holding the next larger position than ``victim``'s in the same (row, head)."""
    pos = state.positions
    mine = pos.gather(2, victim[..., None])  # (B, H, 1)
    return torch.where(pos > mine, pos, FAR).argmin(dim=-1)  # free slots hold -1: never "to the right"


@dataclass
class LegacyWeightedKV(Policy):
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

    name: ClassVar[str] = "legacy_weightedkv"
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


@dataclass
class LegacyWeightedKVEvict(LegacyWeightedKV):
    """Evict the candidate with the lowest average attention ā = a / n; k_j and v_j both go.

    Identical to ``WeightedKV`` (per KV head, ā temporary, same sinks/recent split) except that
    nothing is merged: effectively H2O with an average instead of a sum.

    Reference: WeightedKV (arXiv:2503.01330) §V-B, Fig. 4 "Eviction".
    """

    name: ClassVar[str] = "legacy_weightedkv_evict"
    merges: ClassVar[bool] = False

    def merge(self, state: LayerState, victim: Tensor, active: Tensor) -> None:
        """Eviction: nothing to fold in."""


@dataclass
class LegacyCaM(StreamingLLM):
    """Evict as StreamingLLM; before removal, maybe add the victim's value to the next values.

    Victim j is the oldest non-sink token (the one leaving the window); its targets are the next
    ``merge_num`` valid slots by position. Per (batch row, KV head), with ``acc`` the summed attention,

        p = acc[j] / mean(acc[targets])   (NaN -> 0),  gate ~ Bernoulli(clamp(p, 0, 1))
        v[targets] += gate * v[j] / merge_num

    The target range is clipped to the cache end but the divisor stays ``merge_num``; targets are
    not renormalised; the key and the victim's statistics are dropped. Interpretations:
    ``merge_num=16`` and the sink + window cache come from the official streaming code
    (``StartRecentKVCache_cam``); the gate is drawn as ``u < p`` with
    ``u = uniform(seed, window, layer, head, victim position)``, so runs are reproducible and each window's
    draws do not depend on the batch it runs in.

    Reference: Zhang et al., ICML 2024; WeightedKV (arXiv:2503.01330) §II, §V-A.
    """

    merge_num: int = 16
    seed: int = 0

    name: ClassVar[str] = "legacy_cam"
    seeded: ClassVar[bool] = True
    needs_attention: ClassVar[bool] = True
    stats: ClassVar[tuple[str, ...]] = ("acc",)
    merges: ClassVar[bool] = True

    def _plan(self, state: LayerState, victims: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
        """For victims (B, H, R) taken oldest first: (index (B, H, R, 1+M) = victim then targets, gate (B, H, R, M)).

        The targets of a victim are the next ``merge_num`` held slots by position. Victims leave
        oldest first, so those are the same before and during a pass: one sort serves them all.
        """
        B, H, C = state.positions.shape
        M = self.merge_num
        pos = state.positions
        by_position = state.by_position()  # (B, H, C): slots oldest first
        mine = pos.gather(2, victims)  # (B, H, R)
        # (B, H, R, 1)
        rank = ((pos[:, :, None, :] >= 0) & (pos[:, :, None, :] < mine[..., None])).sum(-1, keepdim=True)
        target_rank = rank + 1 + torch.arange(M, device=pos.device)  # (B, H, R, M)
        valid = target_rank < state.n_valid()[..., None, None]  # clipped to the newest token
        targets = by_position.gather(2, target_rank.clamp_max(C - 1).flatten(2)).view(B, H, -1, M)
        # Out-of-range targets point at the victim itself and add nothing there (it is freed next).
        index = torch.cat([victims[..., None], torch.where(valid, targets, victims[..., None])], -1)  # (B, H, R, 1+M)

        acc = state.acc.gather(2, index.flatten(2)).view(index.shape)  # (B, H, R, 1+M)
        mean = torch.where(valid, acc[..., 1:], 0.0).sum(-1) / valid.sum(-1)  # (B, H, R)
        p = torch.nan_to_num(acc[..., 0] / mean, nan=0.0).clamp(0.0, 1.0)  # inf -> 1
        heads = torch.arange(H, device=pos.device)[None, :, None]  # (1, H, 1)
        u = uniform(self.seed, row_ids(state), state.layer, heads, mine)  # (B, H, R): a token leaves once
        gate = ((u < p) & active)[..., None] & valid  # (B, H, R, M): Bernoulli(p), in range
        return index, gate

    def _add(self, state: LayerState, index: Tensor, gate: Tensor) -> None:
        """v[targets] += gate * v[victim] / merge_num for one victim per (B, H): index (B, H, 1+M)."""
        B, H, M1 = index.shape
        for tensor in state.value_tensors():
            wide = index[..., None].expand(B, H, M1, tensor.shape[-1])  # (B, H, 1+M, D)
            rows = tensor.gather(2, wide).float()  # (B, H, 1+M, D): v_j, then the targets
            merged = rows[:, :, 1:] + gate[..., None] * rows[:, :, :1] / self.merge_num  # (B, H, M, D)
            tensor.scatter_(2, wide[:, :, 1:], merged.to(tensor.dtype))  # in place

    def merge(self, state: LayerState, victim: Tensor, active: Tensor) -> None:
        index, gate = self._plan(state, victim[..., None], active[..., None])
        self._add(state, index[:, :, 0], gate[:, :, 0])

    def merge_ranked(self, state: LayerState, victims: Tensor, active: Tensor) -> None:
        """A long prompt's merges: every target and gate once, then one gather-add per victim, oldest first."""
        index, gate = self._plan(state, victims, active)
        for i in range(victims.shape[-1]):
            self._add(state, index[:, :, i], gate[:, :, i])
