"""Random eviction: a sanity baseline that ignores attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy
from analysis.ops import uniform


def row_ids(state: LayerState) -> Tensor:
    """(B, 1, 1) window ids that seed each row's draws (the row index when none were given).

    The cache puts ``row_ids`` on the state's device once; nothing is copied here per step.
    """
    if state.row_ids is None:
        return torch.arange(state.keys.shape[0], device=state.positions.device)[:, None, None]
    return state.row_ids[:, None, None]


@dataclass
class RandomPolicy(Policy):
    """Evict a uniformly random candidate per (batch row, KV head).

    Scores are U[0, 1) draws from ``uniform(seed, window, layer, head, step, position)``: fresh each
    step, reproducible, and the same for a window whatever batch it runs in. Same ``sinks``/``recent``
    split as the scored methods. Not in the paper (which has no random baseline): a floor for the
    scored methods.

    Reference: WeightedKV (arXiv:2503.01330) §V-A lists no random baseline.
    """

    seed: int = 0

    name: ClassVar[str] = "random"
    seeded: ClassVar[bool] = True
    in_paper: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False

    def score(self, state: LayerState) -> Tensor:
        heads = torch.arange(state.keys.shape[1], device=state.positions.device)[None, :, None]  # (1, H, 1)
        return uniform(self.seed, row_ids(state), state.layer, heads, state.step, state.positions)  # (B, H, C)
