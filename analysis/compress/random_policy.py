"""Random eviction: a sanity baseline that ignores attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy, Seeded


@dataclass
class RandomPolicy(Seeded, Policy):
    """Evict a uniformly random candidate per (batch row, KV head).

    Scores are U[0, 1) draws from a generator seeded with ``seed`` and created lazily on the
    state's device, so runs are reproducible. Same ``sinks``/``recent`` split as the scored
    methods. Not in the paper (which has no random baseline): a floor for the scored methods.

    Reference: WeightedKV (arXiv:2503.01330) §V-A lists no random baseline; digest §4.
    """

    seed: int = 0

    name: ClassVar[str] = "random"
    needs_attention: ClassVar[bool] = False

    def score(self, state: LayerState) -> Tensor:
        B, H, L, _ = state.keys.shape
        device = state.keys.device
        return torch.rand((B, H, L), generator=self.generator(device), device=device)  # (B, H, L)
