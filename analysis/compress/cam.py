"""CaM: StreamingLLM eviction whose victim's value is merged, at random, into its successors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState
from analysis.compress.streaming_llm import StreamingLLM


@dataclass
class CaM(StreamingLLM):
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
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    name: ClassVar[str] = "cam"
    needs_attention: ClassVar[bool] = True

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def merge(self, state: LayerState, victim: Tensor) -> None:
        B, H, L, D = state.values.shape
        device = state.values.device
        # Targets j+1 .. j+merge_num, clipped to the cache end; clipped ones point at j itself and
        # add nothing there (j is removed next), so the scatter below has no conflicting writes.
        offsets = torch.arange(1, self.merge_num + 1, device=device)  # (M,)
        target = victim[..., None] + offsets  # (B, H, M)
        valid = target < L  # (B, H, M)
        target = torch.where(valid, target, victim[..., None])  # (B, H, M)

        acc_victim = state.acc.gather(2, victim[..., None])[..., 0]  # (B, H)
        acc_target = state.acc.gather(2, target) * valid  # (B, H, M)
        mean_target = acc_target.sum(-1) / valid.sum(-1)  # (B, H)
        p = torch.nan_to_num(acc_victim / mean_target, nan=0.0).clamp(0.0, 1.0)  # (B, H)
        u = torch.rand((B, H), generator=self.generator(device), device=device)  # (B, H)
        gate = (u < p).float()  # (B, H)

        v_victim = state.values.gather(2, victim[:, :, None, None].expand(B, H, 1, D))  # (B, H, 1, D)
        weight = gate[..., None] * valid / self.merge_num  # (B, H, M)
        wide = target[..., None].expand(B, H, self.merge_num, D)  # (B, H, M, D)
        merged = state.values.gather(2, wide).float() + weight[..., None] * v_victim.float()
        state.values = state.values.scatter(2, wide, merged.to(state.values.dtype))  # (B, H, L, D)
