"""H2O: heavy hitters by accumulated attention, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from analysis.compress.base import LayerState, Policy


@dataclass
class H2O(Policy):
    """Evict the candidate with the lowest *summed* attention ``acc``, per (batch row, KV head).

    Interpretations: decisions are per KV head, on the GQA group-mean attention that
    ``LayerState.observe`` accumulates (official H2O sums over the batch too; here batch rows are
    independent); the score is a running sum, not an average, so older tokens are favoured. The
    official code has no sinks; for comparability every scored method uses the same
    ``sinks``/``recent`` split (default 4 + ``budget // 2 - 4``), so the comparison isolates the
    score. One token is evicted per decoding step, as H2O's ``topk`` does when it overflows by one.

    Reference: Zhang et al., NeurIPS 2023; WeightedKV (arXiv:2503.01330) §V-A.
    """

    name: ClassVar[str] = "h2o"
    stats: ClassVar[tuple[str, ...]] = ("acc",)

    def score(self, state: LayerState) -> Tensor:
        return state.acc  # (B, H, C)
