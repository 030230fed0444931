"""FullKV: the uncompressed reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from analysis.compress.base import LayerState, Policy


@dataclass
class Full(Policy):
    """Keep every slot: the FullKV row of Table I.

    Any budget is accepted (``None`` included) and ignored; ``compress`` returns the state as is.

    Reference: WeightedKV (arXiv:2503.01330) §V-A, Table I "FullKV".
    """

    budget: int | None = None

    name: ClassVar[str] = "full"
    compresses: ClassVar[bool] = False
    needs_attention: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """No split to validate: nothing is ever evicted."""

    def check_budget(self, budget: int) -> None:
        """Any budget is fine: it is ignored."""

    def score(self, state: LayerState) -> Tensor:
        raise NotImplementedError("Full never selects a victim")

    def compress(self, state: LayerState) -> LayerState:
        state.pending = 0
        return state
