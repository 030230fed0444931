"""CaM: StreamingLLM eviction whose victim's value is merged, at random, into its successors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState
from analysis.compress.random_policy import row_ids
from analysis.compress.streaming_llm import StreamingLLM
from analysis.ops import uniform


@dataclass
class CaM(StreamingLLM):
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

    name: ClassVar[str] = "cam"
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
