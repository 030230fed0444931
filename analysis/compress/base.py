"""The one compression contract: per-layer cache state and the policy that shrinks it.

Every method (WeightedKV and its baselines) is a small ``Policy`` subclass that only says how to
*score* cache slots and, for merging methods, how to *merge* the victim into the survivors. The base
class does the rest once, for all of them: protecting the sinks and the recent window, picking one
victim per (batch row, KV head) with an argmin, and removing it with a gather.

The same ``LayerState`` / ``Policy.compress`` pair is used by the transformers ``Cache`` inside
``generate()``, by the perplexity evaluator and by the perturbation study: there is no second
simulation of any method.

Layout: slots are dense and ordered oldest -> newest along dim 2, so "right neighbour" is index j+1.
All per-step work is batched over (B, H) with fixed shapes and no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.errors import UserError


def group_mean(attn: Tensor, kv_heads: int) -> Tensor:
    """Average the query heads of each GQA group: (B, Hq, ...) -> (B, kv_heads, ...) float32.

    Each query's row stays a distribution over the slots, so per-KV-head scores keep the paper's
    scale whatever the group size.
    """
    B, Hq = attn.shape[:2]
    return attn.float().view(B, kv_heads, Hq // kv_heads, *attn.shape[2:]).mean(dim=2)


@dataclass
class LayerState:
    """One layer's compressed cache and the attention statistics of every slot.

    Statistics are per KV head: attention of the query heads of one GQA group is averaged over the
    group, so each query still contributes a distribution that sums to 1 over the slots.

    The state owns its tensors: ``append`` and ``remove`` always build new ones, so a merge may
    write into ``values`` in place (one slot, not a copy of the cache). Take ``clone()`` before
    compressing a state whose tensors you keep elsewhere.
    """

    keys: Tensor  # (B, H, L, D), post-RoPE, as the model's attention reads them
    values: Tensor  # (B, H, L, D)
    positions: Tensor  # (B, H, L) int64: original token position held by the slot
    acc: Tensor  # (B, H, L) float32: attention received, summed over every query that saw the slot
    count: Tensor  # (B, H, L) float32: how many queries saw the slot
    last: Tensor  # (B, H, L) float32: attention from the newest query only (TOVA)

    @classmethod
    def empty(cls, like_keys: Tensor, like_values: Tensor) -> "LayerState":
        B, H, _, D = like_keys.shape
        stats = like_keys.new_zeros((B, H, 0), dtype=torch.float32)
        return cls(
            keys=like_keys[:, :, :0],
            values=like_values[:, :, :0],
            positions=torch.zeros((B, H, 0), dtype=torch.long, device=like_keys.device),
            acc=stats,
            count=stats.clone(),
            last=stats.clone(),
        )

    def clone(self) -> "LayerState":
        return LayerState(*(t.clone() for t in (self.keys, self.values, self.positions, self.acc, self.count, self.last)))

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add new tokens at the right; their statistics start at zero.

        keys/values: (B, H, q, D); positions: (q,) or (B, q) original token positions.
        """
        B, H, q, _ = keys.shape
        positions = positions.to(self.positions.device).reshape(-1, q).expand(B, q)  # (B, q)
        zeros = self.acc.new_zeros((B, H, q))
        self.keys = torch.cat([self.keys, keys], dim=2)
        self.values = torch.cat([self.values, values], dim=2)
        self.positions = torch.cat([self.positions, positions[:, None, :].expand(B, H, q)], dim=2)
        self.acc = torch.cat([self.acc, zeros], dim=2)
        self.count = torch.cat([self.count, zeros], dim=2)
        self.last = torch.cat([self.last, zeros], dim=2)

    def observe(self, attn: Tensor) -> None:
        """Accumulate the attention the newest ``q`` queries paid to every slot.

        attn: (B, Hq, q, L) softmax weights over the current slots, with Hq a multiple of H (GQA).
        The count is structural (causal order), not read off the weights, so a weight that
        underflows to 0 still counts as "seen".
        """
        q, L = attn.shape[2:]
        grouped = group_mean(attn, self.acc.shape[1])  # (B, H, q, L)
        self.acc = self.acc + grouped.sum(dim=2)
        # Old slots were seen by all q new queries; new slot t (0-based among the q) by q - t.
        seen = torch.full((L,), float(q), device=attn.device)
        seen[L - q :] = torch.arange(q, 0, -1, device=attn.device, dtype=torch.float32)
        self.count = self.count + seen
        self.last = grouped[:, :, -1]

    def remove(self, victim: Tensor) -> None:
        """Delete one slot per (B, H): ``victim`` (B, H) int64.

        Slots at or after the victim take their right neighbour's contents: a shift done with
        ``where`` on two views, which reads and writes each tensor once (cheaper than a gather).
        """
        after = torch.arange(self.length - 1, device=victim.device) >= victim[..., None]  # (B, H, L-1)
        wide = after[..., None]  # (B, H, L-1, 1)
        self.keys = torch.where(wide, self.keys[:, :, 1:], self.keys[:, :, :-1])
        self.values = torch.where(wide, self.values[:, :, 1:], self.values[:, :, :-1])
        self.positions = torch.where(after, self.positions[:, :, 1:], self.positions[:, :, :-1])
        self.acc = torch.where(after, self.acc[:, :, 1:], self.acc[:, :, :-1])
        self.count = torch.where(after, self.count[:, :, 1:], self.count[:, :, :-1])
        self.last = torch.where(after, self.last[:, :, 1:], self.last[:, :, :-1])

    def average_attention(self) -> Tensor:
        """WeightedKV's score a / n (B, H, L); a slot nobody has seen yet scores 0."""
        return self.acc / self.count.clamp_min(1.0)


class Seeded:
    """For randomised methods (a ``seed`` field): one generator, seeded, made on the device of first use."""

    def generator(self, device: torch.device) -> torch.Generator:
        gen = self.__dict__.get("_generator")
        if gen is None or gen.device != device:
            gen = self.__dict__["_generator"] = torch.Generator(device=device).manual_seed(self.seed)
        return gen


@dataclass
class Policy:
    """A KV-cache compression method with a per-layer budget of ``budget`` slots.

    ``sinks`` first slots and ``recent`` newest slots are never victims (``recent=None`` means
    ``budget // 2 - sinks``, the paper's 4 + 124 for m = 256). Subclasses set ``name`` and override
    ``score`` (lower = evicted first) and, when they merge, ``merge``.
    """

    budget: int
    sinks: int = 4
    recent: int | None = None

    name: ClassVar[str] = ""
    needs_attention: ClassVar[bool] = True  # the cache must be fed softmax weights (eager)
    per_layer: ClassVar[bool] = False  # one decision shared by all KV heads of a layer (TOVA)

    def __post_init__(self) -> None:
        if self.recent is None:
            self.recent = max(self.budget // 2 - self.sinks, 0)
        if self.budget <= 0 or self.sinks < 0 or self.recent < 0:
            raise UserError(f"budget must be positive and sinks, recent not negative, got {self._split()}")
        if self.budget <= self.sinks + self.recent:
            raise UserError(
                f"budget {self.budget} leaves no room to compress: it must exceed sinks + recent "
                f"({self.sinks} + {self.recent} = {self.sinks + self.recent})"
            )

    def _split(self) -> str:
        return f"budget={self.budget}, sinks={self.sinks}, recent={self.recent}"

    # --- what a method defines -------------------------------------------------------------
    def score(self, state: LayerState) -> Tensor:
        """(B, H, L) or, if ``per_layer``, (B, 1, L): lower is evicted first."""
        raise NotImplementedError

    def merge(self, state: LayerState, victim: Tensor) -> None:
        """Fold the victim (B, H) into the survivors before it is removed; eviction does nothing."""

    # --- shared machinery ------------------------------------------------------------------
    def candidates(self, length: int, device: torch.device) -> Tensor:
        """(L,) bool: slots that may be victims. The newest slot never is, so j + 1 exists."""
        index = torch.arange(length, device=device)
        return (index >= self.sinks) & (index < length - max(self.recent, 1))

    def select(self, state: LayerState) -> Tensor:
        """One victim per (B, H): the lowest-scoring candidate. Returns (B, H) int64."""
        scores = self.score(state).float()
        allowed = self.candidates(state.length, scores.device)
        victim = scores.masked_fill(~allowed, float("inf")).argmin(dim=-1)  # (B, H) or (B, 1)
        return victim.expand(state.keys.shape[0], state.keys.shape[1])

    def compress(self, state: LayerState) -> LayerState:
        """Shrink ``state`` to the budget, one victim at a time so merges cascade as in the paper.

        During decoding the cache overflows by exactly one slot, so this is one iteration; after a
        long prefill it runs ``L - budget`` iterations (each batched over B and H).
        """
        for _ in range(state.length - self.budget):
            victim = self.select(state)
            self.merge(state, victim)
            state.remove(victim)
        return state
