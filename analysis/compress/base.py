"""The one compression contract: per-layer cache state and the policy that shrinks it.

Every method (WeightedKV and its baselines) is a small ``Policy`` subclass that only says how to
*score* cache slots and, for merging methods, how to *merge* the victim into the survivors. The base
class does the rest once, for all of them: protecting the sinks and the recent window, picking one
victim per (batch row, KV head), and freeing it.

The same ``LayerState`` / ``Policy.compress`` pair is used by the transformers ``Cache`` inside
``generate()``, by the perplexity evaluator and by the perturbation study: there is no second
simulation of any method.

Layout: every layer holds C preallocated slots per (batch row, KV head). A slot holds a token
(``positions >= 0``) or is free (``-1``). A new token is written into a free slot (the one the last
victim left) and a victim is freed in place, so a decoding step copies nothing. Slot order is *not*
position order: "right neighbour" means the valid slot of the same (row, head) holding the next
larger position, and sinks and the recent window are defined by position. ``ordered()`` gives a
dense, position-sorted copy for reading. Each (row, head) can have its own budget; a head under its
budget holds free slots, which attention masks to exactly zero weight (``analysis.runtime.kernel``).

The per-step path has static shapes and no host synchronisation: host-side bookkeeping (how many
slots may overflow, when to grow) uses Python ints that do not depend on tensor contents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.errors import UserError
from analysis.ops import FAR, group_mean, seen_counts

STATS = ("acc", "count", "last")
SLOT_STATS = (*STATS, "depth")  # per-slot statistics a state may keep; ``depth`` only when asked for


@dataclass(eq=False)
class LayerState:
    """One layer's compressed cache and the attention statistics of every slot.

    Statistics are per KV head: attention of the query heads of one GQA group is averaged over the
    group, so each query still contributes a distribution that sums to 1 over the slots. Only the
    statistics named in ``stats`` are kept up to date (the others stay 0).
    """

    keys: Tensor  # (B, H, C, D), post-RoPE, as the model's attention reads them
    values: Tensor  # (B, H, C, Dv)
    positions: Tensor  # (B, H, C) int64: original token position held by the slot, -1 when free
    acc: Tensor  # (B, H, C) float32: attention received, summed over every query that saw the slot
    count: Tensor  # (B, H, C) float32: how many queries saw the slot
    last: Tensor  # (B, H, C) float32: attention from the newest query only (TOVA)
    step: Tensor  # () int64 on the device: tokens appended so far (a tensor, so a CUDA graph sees it move)
    seen: int = 0  # the same count on the host, for bookkeeping that must not read the device
    stats: tuple[str, ...] = STATS
    layer: int = 0  # seeds per-layer random draws
    row_ids: Tensor | None = None  # (B,) int64 window ids: seeds per-row random draws (default: row index)
    budget: Tensor | None = None  # (1 or B, H) int64 per-head budgets; None: the policy's own
    budget_range: tuple[int, int] | None = None  # (min, max) of ``budget``, known on the host
    merge_mask: Tensor | None = None  # (1 or B, H) bool: heads whose WeightedKV victim is merged
    recent: Tensor | None = None  # (1, H, 1) int64 per-head recent window; None: the policy's own
    mixing: Tensor | None = None  # (B, H, C, T) float32: original tokens each slot's value mixes
    tracked: Tensor | None = None  # (B, T) int64: the positions ``mixing``'s columns follow; None: all, 0..T-1
    max_valid: int = 0  # host-side upper bound on valid slots in any (row, head)
    pending: int = 0  # tokens appended since the last compression
    depth: Tensor | None = None  # (B, H, C) float32: merged tokens a slot's value carries; kept if "depth" in stats

    @classmethod
    def empty(cls, like_keys: Tensor, like_values: Tensor, capacity: int = 0, stats=STATS, layer: int = 0,
              row_ids: Tensor | None = None, track_mixing: int | Tensor = 0) -> "LayerState":
        """A state with ``capacity`` free slots shaped like ``like_keys`` / ``like_values`` (B, H, ·, D).

        ``track_mixing``: an int T > 0 records every position's weight in each slot (T grows with the
        tokens seen); a (B, T) tensor of positions records only those (memory independent of length).
        """
        B, H, _, D = like_keys.shape
        device = like_keys.device
        tracked = track_mixing.to(device=device, dtype=torch.long) if isinstance(track_mixing, Tensor) else None
        columns = tracked.shape[-1] if tracked is not None else int(track_mixing)
        stat = torch.zeros((B, H, capacity), dtype=torch.float32, device=device)
        return cls(
            keys=like_keys.new_zeros((B, H, capacity, D)),
            values=like_values.new_zeros((B, H, capacity, like_values.shape[-1])),
            positions=torch.full((B, H, capacity), -1, dtype=torch.long, device=device),
            acc=stat, count=stat.clone(), last=stat.clone(), depth=stat.clone() if "depth" in stats else None,
            step=torch.zeros((), dtype=torch.long, device=device),
            stats=tuple(stats), layer=layer, row_ids=row_ids,
            mixing=torch.zeros((B, H, capacity, columns), device=device) if columns else None,
            tracked=tracked if columns else None,
        )

    def clone(self) -> "LayerState":
        copy = lambda t: t.clone() if isinstance(t, Tensor) else t  # noqa: E731
        return LayerState(**{f: copy(getattr(self, f)) for f in self.__dataclass_fields__})

    # --- reading ---------------------------------------------------------------------------
    @property
    def valid(self) -> Tensor:
        return self.positions >= 0  # (B, H, C)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def n_valid(self) -> Tensor:
        return self.valid.sum(dim=-1)  # (B, H)

    def average_attention(self) -> Tensor:
        """WeightedKV's score a / n (B, H, C); a slot nobody has seen yet scores 0."""
        return self.acc / self.count.clamp_min(1.0)

    def value_tensors(self) -> list[Tensor]:
        """What a merge mixes: the values and, when tracked, each slot's token mixture."""
        return [self.values] if self.mixing is None else [self.values, self.mixing]

    def ordered(self) -> "LayerState":
        """A dense copy with the valid slots sorted by position (B, H, L, ·); not for the per-step path.

        Every (row, head) must hold the same number of tokens (true unless budgets differ per head).
        """
        counts = self.n_valid()
        if counts.numel() and bool((counts != counts.flatten()[0]).any()):
            raise UserError("ordered() needs the same number of tokens in every (row, head); read `valid` instead")
        L = int(counts.flatten()[0]) if counts.numel() else 0
        dense = self.clone()
        for name, tensor in self._gathered(self.by_position()[..., :L]).items():
            setattr(dense, name, tensor)
        dense.max_valid = L
        return dense

    def by_position(self) -> Tensor:
        """(B, H, C) slot indices, held slots oldest first, then the free ones."""
        return torch.where(self.valid, self.positions, FAR).argsort(dim=-1)

    def _gathered(self, order: Tensor) -> dict[str, Tensor]:
        """Every per-slot tensor taken at the slots ``order`` (B, H, L): field name -> (B, H, L, ·)."""
        out = {}
        for name in ("keys", "values", "mixing"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.gather(2, order[..., None].expand(*order.shape, t.shape[-1]))
        for name in ("positions", *SLOT_STATS):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).gather(2, order)
        return out

    # --- writing ---------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        """Add free slots at the end (host decision, rare: a long prompt, or the first steps of ``full``)."""
        extra = capacity - self.capacity
        pad = lambda t, fill: torch.cat([t, t.new_full((*t.shape[:2], extra, *t.shape[3:]), fill)], dim=2)  # noqa: E731
        self.keys, self.values = pad(self.keys, 0), pad(self.values, 0)
        self.positions = pad(self.positions, -1)
        self.acc, self.count, self.last = pad(self.acc, 0), pad(self.count, 0), pad(self.last, 0)
        if self.depth is not None:
            self.depth = pad(self.depth, 0)
        if self.mixing is not None:
            self.mixing = pad(self.mixing, 0)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor | None = None) -> Tensor:
        """Write q new tokens into free slots; their statistics start at zero. Returns the slots (B, H, q).

        keys/values: (B, H, q, D). ``positions`` (q,) or (B, q) defaults to the next q positions.
        The first q free slots (lowest index) are used, so a fresh state fills in position order.
        """
        B, H, q, D = keys.shape
        if self.max_valid + q > self.capacity:
            self._grow(self.max_valid + q)
        if positions is None:
            positions = self.step + torch.arange(q, device=self.step.device)
        positions = positions.to(self.positions.device).reshape(-1, q).expand(B, q)  # (B, q)
        free = self.positions < 0  # (B, H, C)
        if q == 1:
            slots = free.to(torch.uint8).argmax(dim=-1, keepdim=True)  # (B, H, 1): first free slot
        else:
            index = torch.arange(self.capacity, device=free.device)
            slots = torch.where(free, index, index + self.capacity).topk(q, dim=-1, largest=False).indices
        wide = slots[..., None]  # (B, H, q, 1)
        self.keys.scatter_(2, wide.expand(B, H, q, D), keys.to(self.keys.dtype))
        self.values.scatter_(2, wide.expand(B, H, q, self.values.shape[-1]), values.to(self.values.dtype))
        self.positions.scatter_(2, slots, positions[:, None, :].expand(B, H, q))
        for name in self.stats:
            getattr(self, name).scatter_(2, slots, 0.0)
        if self.mixing is not None:
            self._track(slots, positions)
        self.step += q
        self.seen += q
        self.max_valid += q
        self.pending += q
        return slots

    def _track(self, slots: Tensor, positions: Tensor) -> None:
        """Each new slot's mixture is its own token: a one-hot row at its position."""
        B, H, q = slots.shape
        if self.tracked is not None:  # only the followed positions: (B, q, T) matches, one column each
            hit = (positions[:, :, None] == self.tracked[:, None, :]).float()
            T = hit.shape[-1]
            self.mixing.scatter_(2, slots[..., None].expand(B, H, q, T), hit[:, None].expand(B, H, q, T))
            return
        need = self.seen + q
        if need > self.mixing.shape[-1]:
            self.mixing = torch.cat([self.mixing,
                                     self.mixing.new_zeros((*self.mixing.shape[:3], need - self.mixing.shape[-1]))], -1)
        T = self.mixing.shape[-1]
        onehot = torch.nn.functional.one_hot(positions, T).float()[:, None].expand(B, H, q, T)  # (B, H, q, T)
        self.mixing.scatter_(2, slots[..., None].expand(B, H, q, T), onehot)

    def observe(self, attn: Tensor) -> None:
        """Accumulate the attention the newest ``q`` queries paid to every slot.

        attn: (B, Hq, q, C) softmax weights over the physical slots (free slots carry weight 0),
        with Hq a multiple of H (GQA). Nothing is kept that refers to ``attn`` afterwards.
        """
        if not self.stats:
            return
        q = attn.shape[2]
        grouped = group_mean(attn, self.positions.shape[1])  # (B, H, q, C)
        if "acc" in self.stats:
            self.acc += grouped.sum(dim=2)
        if "count" in self.stats:
            if q == 1:  # every valid slot is at or before the newest position
                self.count += self.valid
            else:
                self.count += seen_counts(self.positions, self.step - q, q)
        if "last" in self.stats:
            self.last.copy_(grouped[:, :, -1])

    def take_rows(self, index: Tensor) -> None:
        """Row r becomes a copy of row ``index[r]`` (R,) int64: one prompt's prefill shared by several rows
        (methods) of a batch. Per-row settings (``budget``, ``row_ids``, ...) are the caller's, already R rows."""
        for name in ("keys", "values", "positions", "acc", "count", "last", "depth", "mixing", "tracked"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index))  # (U, ...) -> (R, ...)

    def remove(self, victim: Tensor, active: Tensor | None = None) -> None:
        """Free one slot per (B, H): ``victim`` (B, H) int64, only where ``active`` (B, H) is True."""
        index = victim[..., None]  # (B, H, 1)
        freed = torch.full_like(index, -1)
        if active is not None:
            freed = torch.where(active[..., None], freed, self.positions.gather(2, index))
        self.positions.scatter_(2, index, freed)

    def compact(self, capacity: int) -> None:
        """Shrink the buffers to ``capacity`` slots, keeping every valid slot (after a long prompt)."""
        if capacity >= self.capacity:
            return
        for name, tensor in self._gathered(self.by_position()[..., :capacity]).items():
            setattr(self, name, tensor.contiguous())


@dataclass
class Policy:
    """A KV-cache compression method with a per-layer budget of ``budget`` slots.

    ``sinks`` first positions and ``recent`` newest positions are never victims (``recent=None``
    means ``budget // 2 - sinks``, the paper's 4 + 124 for m = 256). Subclasses set ``name`` and
    ``stats`` (the statistics they read) and override ``score`` (lower = evicted first) and, when
    they merge, ``merge``. A state's own ``budget`` (per head, from a plan) overrides ``budget``.
    """

    budget: int
    sinks: int = 4
    recent: int | None = None

    # Capabilities: code asks these, never the method's name.
    name: ClassVar[str] = ""
    compresses: ClassVar[bool] = True  # False for the uncompressed reference (``full``)
    needs_attention: ClassVar[bool] = True  # the cache must be fed softmax weights (eager)
    per_layer: ClassVar[bool] = False  # one decision shared by all KV heads of a layer (TOVA)
    stats: ClassVar[tuple[str, ...]] = ()  # which LayerState statistics ``score``/``merge`` read
    merges: ClassVar[bool] = False  # ``merge`` changes values (else victims are simply freed)
    seeded: ClassVar[bool] = False  # draws random numbers: takes a ``seed`` field (CaM, random)
    in_paper: ClassVar[bool] = True  # one of the paper's methods or baselines (random is a floor of ours)

    def __post_init__(self) -> None:
        if self.recent is None:
            self.recent = max(self.budget // 2 - self.sinks, 0)
        if self.budget <= 0 or self.sinks < 0 or self.recent < 0:
            raise UserError(f"budget must be positive and sinks, recent not negative, got {self._split()}")
        self.check_budget(self.budget)

    def check_budget(self, budget: int) -> None:
        if budget <= self.sinks + self.recent:
            raise UserError(
                f"budget {budget} leaves no room to compress: it must exceed sinks + recent "
                f"({self.sinks} + {self.recent} = {self.sinks + self.recent})"
            )

    def _split(self) -> str:
        return f"budget={self.budget}, sinks={self.sinks}, recent={self.recent}"

    # --- what a method defines -------------------------------------------------------------
    def score(self, state: LayerState) -> Tensor:
        """(B, H, C) or, if ``per_layer``, (B, 1, C): lower is evicted first."""
        raise NotImplementedError

    def merge(self, state: LayerState, victim: Tensor, active: Tensor) -> None:
        """Fold the victim (B, H) into the survivors where ``active`` (B, H); eviction does nothing."""

    # --- shared machinery ------------------------------------------------------------------
    def candidates(self, state: LayerState) -> Tensor:
        """(B, H, C) bool: valid slots that may be victims. The newest never is, so a right neighbour exists."""
        pos = state.positions
        recent = state.recent.clamp_min(1) if state.recent is not None else max(self.recent, 1)
        return (pos >= self.sinks) & (pos < state.step - recent)

    def select(self, state: LayerState) -> Tensor:
        """One victim per (B, H): the lowest-scoring candidate, ties to the oldest position. Returns (B, H) int64.

        Algorithm 1's argmin runs over positions, so among equal scores (float16 weights that underflow
        to 0, say) the first position goes; slot order is not position order once slots are reused.
        Static shapes, no host read: the minimum, then the oldest position holding it.
        """
        scores = self._candidate_scores(state)  # (B, H or 1, C)
        positions = self._positions(state, scores)  # (B, H or 1, C), unique per (row, head) among held slots
        tied = (scores == scores.min(dim=-1, keepdim=True).values) & (positions >= 0)
        victim = torch.where(tied, positions, FAR).argmin(dim=-1)  # (B, H) or (B, 1)
        return victim.expand(state.keys.shape[0], state.keys.shape[1])

    @staticmethod
    def _positions(state: LayerState, scores: Tensor) -> Tensor:
        """The positions the scores are over: head 0's for a per-layer decision (every head holds the same)."""
        return state.positions if scores.shape[1] == state.positions.shape[1] else state.positions[:, :1]

    def _candidate_scores(self, state: LayerState) -> Tensor:
        """Scores (B, H, C), or (B, 1, C) if ``per_layer``, in float32, +inf on every slot that is no candidate."""
        scores = self.score(state).float()
        allowed = self.candidates(state)
        if scores.shape[1] == 1:  # per-layer decision: every head holds the same positions in the same slots
            allowed = allowed[:, :1]
        return scores.masked_fill(~allowed, float("inf"))

    def _budgets(self, state: LayerState) -> tuple[Tensor | int, int, int]:
        if state.budget is None:
            return self.budget, self.budget, self.budget
        low, high = state.budget_range
        return state.budget, low, high

    def compress(self, state: LayerState) -> LayerState:
        """Shrink every (row, head) to its budget, one victim at a time so merges cascade as in the paper.

        During decoding a head overflows by one slot, so this is one step. After a long prompt the
        victims are ranked once (scores do not change while a pass removes slots: a merge leaves the
        neighbour's statistics alone and candidates are fixed by position), evictions are freed in
        one scatter, and merges run in rank order, each touching two slots.
        """
        budget, low, high = self._budgets(state)
        rounds = max(0, min(state.pending, state.max_valid - low))
        state.pending = 0
        if rounds == 0:
            return state
        over = state.n_valid() - budget  # (B, H): how many victims each head gives up
        if rounds == 1:
            victim = self.select(state)
            self.merge(state, victim, over > 0)
            state.remove(victim, over > 0)
        else:
            self._compress_ranked(state, over, rounds)
        state.max_valid = min(state.max_valid, high)
        return state

    def _compress_ranked(self, state: LayerState, over: Tensor, rounds: int) -> None:
        B, H = over.shape
        scores = self._candidate_scores(state)  # (B, H or 1, C)
        # rank by score, ties by position: a stable sort by score of the slots already in position order
        positions = self._positions(state, scores)
        by_position = torch.where(positions >= 0, positions, FAR).argsort(dim=-1, stable=True)  # held, oldest first
        ranked = scores.gather(-1, by_position).argsort(dim=-1, stable=True)  # (B, H or 1, C)
        order = by_position.gather(-1, ranked)[..., :rounds]  # (B, H or 1, rounds)
        victims = order.expand(B, H, rounds)  # (B, H, rounds): victims in the order they go
        active = torch.arange(rounds, device=over.device) < over[..., None]  # (B, H, rounds)
        if self.merges:
            self.merge_ranked(state, victims, active)
        freed = torch.where(active, -1, state.positions.gather(2, victims))  # then free them all at once
        state.positions.scatter_(2, victims, freed)

    def merge_ranked(self, state: LayerState, victims: Tensor, active: Tensor) -> None:
        """Merge a pass's victims (B, H, R) in rank order; they are freed afterwards, all at once.

        This default frees each victim right after its merge, as a decoding step would; methods
        override it to work out neighbours and weights once for the whole pass.
        """
        for i in range(victims.shape[-1]):
            self.merge(state, victims[..., i], active[..., i])
            state.remove(victims[..., i], active[..., i])
