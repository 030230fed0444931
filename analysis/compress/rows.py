"""Several policies in one batch: each row of a decode compressed by its own method and budget.

A sweep's (method, budget) jobs on the same windows share forward passes this way. Scores,
candidates and merges are each method's own, selected per row with ``where``: nothing is
re-implemented, and a row's result is the one its policy gives alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy
from analysis.errors import UserError


@dataclass(eq=False)
class RowPolicies(Policy):
    """Row ``b`` of the batch is compressed by ``policies[rows[b]]``; budgets come from the state.

    Its capabilities are the union of its policies' (any merges: it merges; the statistics any of
    them reads are kept), as instance attributes shadowing the class defaults.
    """

    policies: list[Policy] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    budget: int = 0
    sinks: int = 0
    recent: int | None = 0

    name = "rows"

    def __post_init__(self) -> None:
        if not self.policies or any(not p.compresses for p in self.policies):
            raise UserError("RowPolicies needs compressing policies: run the uncompressed reference on its own")
        self.rows = list(self.rows)
        self.budget = max(p.budget for p in self.policies)
        self.needs_attention = any(p.needs_attention for p in self.policies)
        self.merges = any(p.merges for p in self.policies)
        self.stats = tuple(dict.fromkeys(s for p in self.policies for s in p.stats))
        self._masks: dict[torch.device, list[Tensor]] = {}

    def row_masks(self, device: torch.device) -> list[Tensor]:
        """Per policy, (B, 1) bool: the rows it owns."""
        if device not in self._masks:
            rows = torch.tensor(self.rows, device=device)
            self._masks[device] = [(rows == i)[:, None] for i in range(len(self.policies))]
        return self._masks[device]

    def _combine(self, state: LayerState, part) -> Tensor:
        masks = self.row_masks(state.positions.device)
        out = None
        for policy, mask in zip(self.policies, masks):
            value = part(policy).expand(state.positions.shape)  # (B, H, C)
            out = value if out is None else torch.where(mask[..., None], value, out)
        return out

    def score(self, state: LayerState) -> Tensor:
        return self._combine(state, lambda p: p.score(state).float())

    def candidates(self, state: LayerState) -> Tensor:
        return self._combine(state, lambda p: p.candidates(state))

    def merge(self, state: LayerState, victim: Tensor, active: Tensor) -> None:
        for policy, mask in zip(self.policies, self.row_masks(state.positions.device)):
            if policy.merges:
                policy.merge(state, victim, active & mask)
