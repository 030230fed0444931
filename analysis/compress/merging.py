"""One merge policy for the whole design space: a ``MergeSpec`` (target, weights, what, guards, selection).

WeightedKV, CaM and ``weightedkv_evict`` are ``MergePolicy`` subclasses that fix a spec; the presets
and any custom point (``merge:target=similar,weights=attention,what=value,cap=2``) are classes made
from a spec by ``spec_class``. Selection stays the method's own score (average attention unless
``select=position``), so every merge is compared paired with its own eviction ablation
(``spec.evict()``: the same selection, ``target=none``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState, Policy
from analysis.compress.merge_parts import TARGETS, WEIGHTS, WHAT, cosine, target_part, weights_part
from analysis.errors import UserError

SELECT = ("average", "position")
PREFIX = "merge:"


@dataclass(frozen=True)
class MergeSpec:
    """A point of the merge space (see ``analysis.compress.merge_parts`` for every part)."""

    target: str = "right"
    weights: str = "attention"
    what: str = "value"
    threshold: float | None = None
    cap: int | None = None
    select: str = "average"
    m: int = 16  # the targets of ``next``

    def __post_init__(self) -> None:
        for key, allowed in (("target", TARGETS), ("weights", WEIGHTS), ("what", WHAT), ("select", SELECT)):
            if getattr(self, key) not in allowed:
                raise UserError(f"merge spec: unknown {key} {getattr(self, key)!r}; valid: {', '.join(allowed)}")
        if self.cap is not None and self.cap < 1:
            raise UserError(f"merge spec: cap must be at least 1 (merges a target may absorb), got {self.cap}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise UserError(f"merge spec: threshold is a cosine in [-1, 1], got {self.threshold}")
        if self.m < 1:
            raise UserError(f"merge spec: m must be at least 1, got {self.m}")
        clash = self._clash()
        if clash:
            raise UserError(f"merge spec: {clash}")

    def _clash(self) -> str | None:
        if self.target == "none" and (self.threshold is not None or self.cap is not None):
            return "target=none merges nothing: threshold and cap need a target"
        if self.threshold is not None and self.target != "similar":
            return f"threshold is a similarity guard: it needs target=similar, not target={self.target}"
        if (self.target == "next") != (self.weights == "gate"):
            return (f"weights={self.weights} with target={self.target}: CaM's gate spreads over the next m "
                    "slots (target=next) and target=next takes only weights=gate")
        if self.target == "next" and (self.what != "value" or self.cap is not None):
            return "target=next (CaM) adds values only: what=value, no cap"
        return None

    # --- text ------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "MergeSpec":
        """``merge:target=similar,weights=attention,what=value,cap=2`` (any order; omitted keys: defaults)."""
        body = text[len(PREFIX):] if text.startswith(PREFIX) else text
        names = {f.name for f in fields(cls)}
        values: dict = {}
        for item in filter(None, (p.strip() for p in body.split(","))):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not value:
                raise UserError(f"merge spec {text!r}: {item!r} is not key=value")
            if key not in names:
                raise UserError(f"merge spec {text!r}: unknown key {key!r}; valid: {', '.join(sorted(names))}")
            if key in values:
                raise UserError(f"merge spec {text!r}: {key} given twice")
            values[key] = _convert(text, key, value)
        return cls(**values)

    def text(self) -> str:
        """The canonical spelling: every key that differs from the default, in field order."""
        default = MergeSpec()
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if getattr(self, f.name) != getattr(default, f.name)]
        return PREFIX + ",".join(parts)

    def evict(self) -> "MergeSpec":
        """The same selection with no merge: this point's eviction ablation."""
        return MergeSpec(target="none", select=self.select)

    # --- what the policy needs -------------------------------------------------------------
    @property
    def stats(self) -> tuple[str, ...]:
        merges = self.target != "none"
        attention = merges and self.weights in ("attention", "votes")
        out = ["acc", "count"] if self.select == "average" or attention else []
        if merges and self.weights == "gate":
            out.append("acc")
        if self.cap is not None or (merges and self.weights == "votes"):
            out.append("depth")
        return tuple(dict.fromkeys(out))


def _convert(text: str, key: str, value: str):
    try:
        if key == "threshold":
            return float(value)
        if key in ("cap", "m"):
            return int(value)
    except ValueError:
        raise UserError(f"merge spec {text!r}: {key} must be a number, got {value!r}") from None
    return value


@dataclass
class MergePolicy(Policy):
    """Select a victim by the spec's score, fold it into its target(s) with the spec's weights, free it.

    Subclasses fix ``spec``; capabilities (``stats``, ``merges``, ``needs_attention``, ``seeded``) follow
    from it (``spec_class`` sets them for a made class). A plan's per-head ``merge_mask`` turns merging
    off per head (evict there).
    """

    spec: ClassVar[MergeSpec] = MergeSpec()

    def __post_init__(self) -> None:
        super().__post_init__()
        spec = self.spec
        m = getattr(self, "merge_num", spec.m)
        self.target = target_part(spec.target, self.sinks, spec.threshold, m)
        self.weights = weights_part(spec.weights, m)

    def score(self, state: LayerState) -> Tensor:
        if self.spec.select == "position":
            return state.positions.float()  # (B, H, C): older = lower = evicted first (StreamingLLM)
        return state.average_attention()  # (B, H, C)

    # --- one merge -------------------------------------------------------------------------
    def _eligible(self, state: LayerState, victim: Tensor) -> Tensor | None:
        """(B, H, C) slots that may absorb victim (B, H), or None: every one.

        The depth cap k: after the merge the target would carry its own merged tokens, the victim and the
        victim's, d_t + 1 + d_j; it must stay at most k. So no value ever mixes more than k + 1 tokens, and a
        victim that already carries k is evicted.
        """
        if self.spec.cap is None:
            return None
        return state.depth + 1.0 + state.depth.gather(2, victim[..., None]) <= self.spec.cap

    def _tensors(self, state: LayerState) -> list[Tensor]:
        if self.spec.what == "key":
            return [state.keys]
        values = state.value_tensors()
        return [state.keys, *values] if self.spec.what == "key_value" else values

    def _fold(self, state: LayerState, victim: Tensor, targets: Tensor, on: Tensor, w_j: Tensor,
              w_t: Tensor | None) -> None:
        """Fold victim (B, H) into targets (B, H, K) where ``on`` (B, H, K), given weights (B, H, 1 or K, 1)."""
        B, H, K = targets.shape
        pair = torch.cat([victim[..., None], targets], -1)  # (B, H, 1 + K): j, then its targets
        on = on[..., None]  # (B, H, K, 1)
        for tensor in self._tensors(state):
            D = tensor.shape[-1]
            wide = pair[..., None].expand(B, H, 1 + K, D)  # (B, H, 1 + K, D)
            rows = tensor.gather(2, wide).float()  # one gather: v_j, then the v_t
            merged = self.weights.rule(w_j, rows[:, :, :1], w_t, rows[:, :, 1:], on)  # (B, H, K, D)
            tensor.scatter_(2, wide[:, :, 1:], merged.to(tensor.dtype))
        if "depth" in state.stats:  # the target now carries the victim and all it carried
            d_j = state.depth.gather(2, victim[..., None])  # (B, H, 1)
            d_t = state.depth.gather(2, targets)
            state.depth.scatter_(2, targets, torch.where(on[..., 0], d_t + 1.0 + d_j, d_t))

    def _active(self, state: LayerState, active: Tensor) -> Tensor:
        if state.merge_mask is None:
            return active
        return active & (state.merge_mask if active.dim() == 2 else state.merge_mask[..., None])

    def merge(self, state: LayerState, victim: Tensor, active: Tensor) -> None:
        if not self.merges:
            return
        active = self._active(state, active)
        targets, ok, cos = self.target.find(state, victim, self._eligible(state, victim))  # (B, H, K)
        if self.weights.needs_cosine and cos is None:
            cos = _pair_cosine(state, victim, targets)
        w_j, w_t = self.weights.pair(self, state, victim[..., None], targets[:, :, None],
                                     None if ok is None else ok[:, :, None], None if cos is None else cos[:, :, None])
        on = active[..., None] if ok is None else active[..., None] & ok  # (B, H, 1 or K)
        self._fold(state, victim, targets, on, w_j[:, :, 0], _first(w_t))

    def merge_ranked(self, state: LayerState, victims: Tensor, active: Tensor) -> None:
        """A long prompt's merges in rank order. Targets (and static weights) are worked out once when a pass
        cannot change them (no depth guard, a target rule that knows the whole pass); else victim by victim."""
        ranked = None if "depth" in state.stats else self.target.ranked(state, victims, self._active(state, active))
        if ranked is None:
            return super().merge_ranked(state, victims, active)  # merge, free, next: as decoding steps do
        active = self._active(state, active)
        targets, ok = ranked  # (B, H, R, K)
        static = None
        if self.weights.static:
            static = self.weights.pair(self, state, victims, targets, ok, None)
        for i in range(victims.shape[-1]):
            victim, target, on = victims[..., i], targets[:, :, i], active[..., i, None] & ok[:, :, i]
            if static is None:
                cos = _pair_cosine(state, victim, target) if self.weights.needs_cosine else None
                w = self.weights.pair(self, state, victim[..., None], target[:, :, None], ok[:, :, i, None],
                                      None if cos is None else cos[:, :, None])
                w_j, w_t = w[0][:, :, 0], _first(w[1])
            else:
                w_j, w_t = static[0][:, :, i], None if static[1] is None else static[1][:, :, i]
            self._fold(state, victim, target, on, w_j, w_t)


def _first(w: Tensor | None) -> Tensor | None:
    return None if w is None else w[:, :, 0]


def _pair_cosine(state: LayerState, victim: Tensor, targets: Tensor) -> Tensor:
    return cosine(state, victim, targets)  # (B, H, K)


@dataclass
class SeededMergePolicy(MergePolicy):
    """A merge that draws random numbers (CaM's gate): it takes a ``seed``."""

    seed: int = 0


def capabilities(spec: MergeSpec) -> dict:
    """The capability ClassVars a policy of ``spec`` declares."""
    stats = spec.stats
    return {"spec": spec, "stats": stats, "merges": spec.target != "none", "seeded": spec.weights == "gate",
            "needs_attention": bool(stats and set(stats) - {"depth"})}


_MADE: dict[tuple[str, MergeSpec, tuple], type[MergePolicy]] = {}


def spec_class(name: str, spec: MergeSpec, **classvars) -> type[MergePolicy]:
    """The policy class of ``spec`` registered as ``name`` (made once, then reused)."""
    key = (name, spec, tuple(sorted(classvars.items())))
    if key not in _MADE:
        base = SeededMergePolicy if spec.weights == "gate" else MergePolicy
        attrs = capabilities(spec) | {"name": name, "in_paper": False, "__doc__": f"The merge {spec.text()}."}
        _MADE[key] = type(f"Merge[{name}]", (base,), attrs | classvars)
    return _MADE[key]


def point(text: str) -> type[MergePolicy]:
    """A custom point of the space, ``merge:key=value,...``, as a policy class named by what was typed."""
    return spec_class(text, MergeSpec.parse(text))


def with_spec(spec: MergeSpec, **changes) -> MergeSpec:
    return replace(spec, **changes)
