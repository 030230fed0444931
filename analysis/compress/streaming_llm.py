"""StreamingLLM: attention sinks plus a sliding window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from analysis.compress.base import LayerState, Policy


@dataclass
class StreamingLLM(Policy):
    """Evict the oldest non-sink slot, the token that leaves the window.

    The score is the slot's position, so the shared argmin over the candidates picks the oldest
    position after the sinks. Whatever ``recent`` is, the cache then holds the ``sinks``
    first tokens and the ``budget - sinks`` newest ones: exactly ``StartRecentKVCache`` with
    ``start_size = sinks`` and ``recent_size = budget - sinks``. No attention is needed.
    Positions are the original ones kept in ``LayerState.positions``; the official code's
    "pos shift" (re-indexing inside the cache) is a model-side choice, not the policy's.

    Reference: Xiao et al., ICLR 2024; WeightedKV (arXiv:2503.01330) §V-A.
    """

    name: ClassVar[str] = "streaming_llm"
    needs_attention: ClassVar[bool] = False

    def score(self, state: LayerState) -> Tensor:
        return state.positions.float()  # (B, H, C): older = lower = evicted first
