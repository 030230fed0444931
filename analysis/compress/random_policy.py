"""Random eviction: a sanity baseline that ignores attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy


@dataclass
class RandomPolicy(Policy):
    """Evict a uniformly random candidate per (batch row, KV head).

    Scores are U[0, 1) draws from a generator seeded with ``seed`` and created lazily on the
    state's device, so runs are reproducible. Same ``sinks``/``recent`` split as the scored
    methods. Not in the paper (which has no random baseline): a floor for the scored methods.

    Reference: WeightedKV (arXiv:2503.01330) §V-A lists no random baseline; digest §4.
    """

    seed: int = 0
    _generator: torch.Generator | None = field(default=None, init=False, repr=False, compare=False)

    name: ClassVar[str] = "random"
    needs_attention: ClassVar[bool] = False

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def score(self, state: LayerState) -> Tensor:
        B, H, L, _ = state.keys.shape
        device = state.keys.device
        return torch.rand((B, H, L), generator=self.generator(device), device=device)  # (B, H, L)
