"""CaM: StreamingLLM eviction whose victim's value is merged, at random, into its successors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Seeded
from analysis.compress.streaming_llm import StreamingLLM


@dataclass
class CaM(Seeded, StreamingLLM):
    """Evict as StreamingLLM; before removal, maybe add the victim's value to the next values.

    Victim j is the oldest non-sink slot (the token leaving the window). Per (batch row, KV head),
    with ``acc`` the summed attention,

        p = acc[j] / mean(acc[j+1 : j+1+merge_num])   (NaN -> 0),  gate ~ Bernoulli(clamp(p, 0, 1))
        v[j+1 : j+1+merge_num] += gate * v[j] / merge_num

    The target range is clipped to the cache end but the divisor stays ``merge_num``; targets are
    not renormalised; the key and the victim's statistics are dropped. Interpretations:
    ``merge_num=16`` and the sink + window cache come from the official streaming code
    (``StartRecentKVCache_cam``); the gate is drawn as ``u < p`` with ``u ~ U[0, 1)`` from a
    generator seeded with ``seed`` and created lazily on the state's device, so runs are
    reproducible and each (B, H) draw is independent of the other rows.

    Reference: Zhang et al., ICML 2024; WeightedKV (arXiv:2503.01330) §II, §V-A; digest §6.4, §8.
    """

    merge_num: int = 16
    seed: int = 0

    name: ClassVar[str] = "cam"
    needs_attention: ClassVar[bool] = True

    def merge(self, state: LayerState, victim: Tensor) -> None:
        B, H, L, D = state.values.shape
        M = self.merge_num
        # Slots j, j+1 .. j+M; targets past the cache end are clipped: they point at j itself and
        # add nothing there (j is removed next), so the scatter below has no conflicting writes.
        index = victim[..., None] + torch.arange(M + 1, device=victim.device)  # (B, H, 1+M)
        valid = index[..., 1:] < L  # (B, H, M)
        index[..., 1:] = torch.where(valid, index[..., 1:], victim[..., None])

        acc = state.acc.gather(2, index)  # (B, H, 1+M)
        mean = torch.where(valid, acc[..., 1:], 0.0).sum(-1) / valid.sum(-1)  # (B, H)
        p = torch.nan_to_num(acc[..., 0] / mean, nan=0.0).clamp(0.0, 1.0)  # (B, H); inf -> 1
        u = torch.rand((B, H), generator=self.generator(victim.device), device=victim.device)
        gate = (u[..., None] < p[..., None]) & valid  # (B, H, M): Bernoulli(p), in range

        wide = index[..., None].expand(B, H, M + 1, D)  # (B, H, 1+M, D)
        rows = state.values.gather(2, wide).float()  # (B, H, 1+M, D): v_j, then the targets
        merged = rows[:, :, 1:] + gate[..., None] * rows[:, :, :1] / M  # (B, H, M, D)
        state.values.scatter_(2, wide[:, :, 1:], merged.to(state.values.dtype))  # in place: see LayerState
