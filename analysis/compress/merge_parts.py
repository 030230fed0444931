"""The parts a merge is made of: where the victim goes (target), with what weights, and what it carries.

A merge folds a victim slot j, chosen by the method's own score, into one or more surviving slots t
before j is freed. Each part is a small object; ``analysis.compress.merging.MergePolicy`` puts one of
each together, so WeightedKV, CaM, the eviction ablation and the field's other rules (KeepKV, D2O,
kvpress's MergingPress, AsymKV) are points of one space, built by one code path.

- *target* (``TARGETS``): ``right`` the next larger position (WeightedKV); ``similar`` the slot whose
  key is most cosine-similar to k_j (KeepKV, D2O, MergingPress); ``next`` the next m slots by
  position (CaM); ``none`` (eviction). Similarity is taken between the *post-RoPE* keys, the ones the
  cache stores and attention reads: pre-RoPE keys are not kept, and recovering them would need the
  model's rotary tables inside the policy, which is model-agnostic. Post-RoPE similarity also mixes
  in position (nearby tokens are rotated alike), which is what a merge that is read by later
  queries' post-RoPE dot products sees.
- *weights* (``WEIGHTS``), a convex pair (w_j, w_t) unless stated: ``attention`` (ā_j, ā_t), the
  average attentions (WeightedKV); ``equal`` (1, 1); ``similarity`` (exp(s), e), D2O's softmax of
  the cosine s against the target's self-similarity 1; ``norm_ratio`` (w, 1 - w) with
  w = max(s, 0)·‖v_j‖ / (‖v_j‖ + ‖v_t‖) (MergingPress, read as a convex pair); ``votes``
  ((1 + d_j)·ā_j, (1 + d_t)·ā_t) with d a slot's merge depth (KeepKV's votes × attention); ``gate``
  CaM's additive v_t += g·v_j / m with g ~ Bernoulli(clamp(a_j / mean a_t, 0, 1)).
- *what merges* (``WHAT``): ``value`` (the key is dropped), ``key_value`` (both, same weights) or
  ``key`` (the value is dropped: AsymKV's asymmetry, the only form a one-slot-per-token cache holds).
- *guards*: ``threshold`` merges only when the best cosine reaches it (D2O, here fixed, not an EMA);
  ``cap`` k: a merge may not leave a value carrying more than k merged tokens (its depth,
  ``LayerState.depth``, counts them through cascades): a slot that has absorbed k is no longer a target,
  and a victim that carries k is evicted.

Every part is vectorised over (batch row, KV head) with static shapes and no host synchronisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from analysis.compress.base import LayerState
from analysis.compress.random_policy import row_ids
from analysis.ops import FAR, convex_merge, uniform

TARGETS = ("right", "similar", "next", "none")
WEIGHTS = ("attention", "equal", "similarity", "norm_ratio", "votes", "gate")
WHAT = ("value", "key_value", "key")


def gather_rows(tensor: Tensor, slots: Tensor) -> Tensor:
    """Rows of ``tensor`` (B, H, C, D) at ``slots`` (B, H, K): (B, H, K, D) in float32."""
    B, H, K = slots.shape
    return tensor.gather(2, slots[..., None].expand(B, H, K, tensor.shape[-1])).float()


def cosine(state: LayerState, victim: Tensor, slots: Tensor | None = None) -> Tensor:
    """Cosine between post-RoPE k_victim (B, H) and every slot's key (B, H, C), or those at ``slots`` (B, H, K)."""
    k_j = gather_rows(state.keys, victim[..., None])  # (B, H, 1, D)
    keys = state.keys.float() if slots is None else gather_rows(state.keys, slots)  # (B, H, C or K, D)
    dots = (keys @ k_j.transpose(-1, -2))[..., 0]  # (B, H, C or K)
    return dots / (keys.norm(dim=-1) * k_j.norm(dim=-1)).clamp_min(1e-12)


# --- targets ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """Where victim j goes. ``find`` gives (targets (B, H, K), ok (B, H, K) or None when one always exists,
    cosine or None) for one victim per (B, H) among ``eligible`` (B, H, C) slots; ``ranked`` (when the targets
    of a long prompt's whole pass are known before its first merge) the same for victims (B, H, R) as (B, H, R, K)."""

    name: ClassVar[str] = ""
    width: ClassVar[int] = 1  # K: slots one victim spreads over

    def find(self, state: LayerState, victim: Tensor, eligible: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        raise NotImplementedError

    def ranked(self, state: LayerState, victims: Tensor, active: Tensor) -> tuple[Tensor, Tensor] | None:
        return None


@dataclass(frozen=True)
class RightNeighbour(Target):
    """The valid slot holding the next larger position (free slots hold -1: never to the right)."""

    name: ClassVar[str] = "right"

    def find(self, state, victim, eligible):
        pos = state.positions
        mine = pos.gather(2, victim[..., None])  # (B, H, 1)
        right = pos > mine if eligible is None else (pos > mine) & eligible  # (B, H, C)
        target = torch.where(right, pos, FAR).argmin(dim=-1, keepdim=True)  # (B, H, 1)
        return target, None if eligible is None else right.any(-1, keepdim=True), None  # None: always found

    def ranked(self, state, victims, active):
        """Victim i goes to the nearest slot to its right still there at its turn: a survivor or a later victim."""
        B, H, R = victims.shape
        pos = state.positions  # (B, H, C)
        rank = torch.full_like(pos, R)  # survivors (and inactive victims) outrank every victim
        rank.scatter_(2, victims, torch.where(active, torch.arange(R, device=pos.device), R))
        mine = pos.gather(2, victims)  # (B, H, R)
        later = torch.arange(R, device=pos.device)[:, None]  # (R, 1)
        neighbour = torch.empty_like(victims)
        for lo in range(0, R, 256):  # (B, H, 256, C) at a time: bounded memory for long prompts
            hi = min(lo + 256, R)
            right = (pos[:, :, None, :] > mine[..., lo:hi, None]) & (rank[:, :, None, :] > later[lo:hi])
            neighbour[..., lo:hi] = torch.where(right, pos[:, :, None, :], FAR).argmin(dim=-1)
        return neighbour[..., None], torch.ones_like(neighbour[..., None], dtype=torch.bool)  # (B, H, R, 1)


@dataclass(frozen=True)
class MostSimilar(Target):
    """The eligible slot whose post-RoPE key is most cosine-similar to k_j (ties: lowest slot).

    Never the victim, a free slot or a sink; with ``threshold``, only when that best cosine reaches it.
    """

    sinks: int = 0
    threshold: float | None = None
    name: ClassVar[str] = "similar"

    def find(self, state, victim, eligible):
        sim = cosine(state, victim)  # (B, H, C)
        slots = torch.arange(state.capacity, device=sim.device)
        allowed = (state.positions >= self.sinks) & (slots != victim[..., None])  # valid, not a sink, not j
        if eligible is not None:
            allowed = allowed & eligible
        best, target = sim.masked_fill(~allowed, -math.inf).max(dim=-1, keepdim=True)  # (B, H, 1)
        ok = allowed.any(-1, keepdim=True)
        if self.threshold is not None:
            ok = ok & (best >= self.threshold)
        return target, ok, best


@dataclass(frozen=True)
class NextByPosition(Target):
    """CaM's targets: the next ``m`` held slots by position, clipped to the newest token."""

    m: int = 16
    name: ClassVar[str] = "next"

    @property
    def width(self) -> int:  # type: ignore[override]
        return self.m

    def find(self, state, victim, eligible):
        targets, ok = self.ranked(state, victim[..., None], torch.ones_like(victim[..., None], dtype=torch.bool))
        return targets[:, :, 0], ok[:, :, 0], None

    def ranked(self, state, victims, active):
        """Victims leave oldest first, so their targets are the same before and during a pass: one sort serves all.

        Out-of-range targets point at the victim itself and add nothing there (it is freed next).
        """
        B, H, C = state.positions.shape
        by_position = state.by_position()  # (B, H, C): slots oldest first
        # A victim's rank among the held positions is its place in that order: the inverse permutation,
        # (B, H, C) memory however many victims a long prompt has.
        place = torch.empty_like(by_position).scatter_(2, by_position, torch.arange(C, device=by_position.device)
                                                       .expand(B, H, C))
        rank = place.gather(2, victims)[..., None]  # (B, H, R, 1)
        target_rank = rank + 1 + torch.arange(self.m, device=rank.device)  # (B, H, R, M)
        valid = target_rank < state.n_valid()[..., None, None]
        targets = by_position.gather(2, target_rank.clamp_max(C - 1).flatten(2)).view(B, H, -1, self.m)
        return torch.where(valid, targets, victims[..., None]), valid


@dataclass(frozen=True)
class NoTarget(Target):
    """Eviction: nothing is merged."""

    name: ClassVar[str] = "none"


# --- weights ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """The pair (w_j, w_t), each (B, H, R, K, 1), of victims (B, H, R) and their targets (B, H, R, K).

    ``static`` weights read only statistics a pass does not change, so a long prompt's are computed
    once; the others are computed victim by victim. ``rule`` folds v_j into v_t.
    """

    name: ClassVar[str] = ""
    static: ClassVar[bool] = True
    needs_cosine: ClassVar[bool] = False

    def pair(self, policy, state: LayerState, victims: Tensor, targets: Tensor, ok: Tensor,
             cos: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def rule(self, w_j: Tensor, v_j: Tensor, w_t: Tensor, v_t: Tensor, on: Tensor) -> Tensor:
        """(w_j v_j + w_t v_t) / (w_j + w_t) where ``on``; elsewhere (and where both weights are 0) v_t."""
        return convex_merge(w_j, v_j, w_t, v_t, on)


def _average(state: LayerState, slots: Tensor) -> Tensor:
    """ā = a / n at ``slots`` (any shape (B, H, ...)), as ``LayerState.average_attention`` there: gathered first."""
    flat = slots.flatten(2)
    return (state.acc.gather(2, flat) / state.count.gather(2, flat).clamp_min(1.0)).view(slots.shape)


@dataclass(frozen=True)
class AttentionWeights(Weights):
    """WeightedKV: (ā_j, ā_t)."""

    name: ClassVar[str] = "attention"

    def pair(self, policy, state, victims, targets, ok, cos):
        both = _average(state, torch.cat([victims[..., None], targets], -1))  # (B, H, R, 1 + K): one gather
        return both[..., :1, None], both[..., 1:, None]


@dataclass(frozen=True)
class EqualWeights(Weights):
    """(1, 1): the plain mean of the two."""

    name: ClassVar[str] = "equal"

    def pair(self, policy, state, victims, targets, ok, cos):
        one = torch.ones(targets.shape + (1,), device=targets.device)
        return one, one


@dataclass(frozen=True)
class SimilarityWeights(Weights):
    """D2O: (exp(s), e), s = cos(k_j, k_t), e = exp(1) the target's similarity with itself."""

    name: ClassVar[str] = "similarity"
    needs_cosine: ClassVar[bool] = True
    static: ClassVar[bool] = False

    def pair(self, policy, state, victims, targets, ok, cos):
        return cos.exp()[..., None], torch.full_like(cos, math.e)[..., None]


@dataclass(frozen=True)
class NormRatioWeights(Weights):
    """MergingPress: (w, 1 - w), w = max(s, 0)·‖v_j‖ / (‖v_j‖ + ‖v_t‖); 0 where both norms are 0."""

    name: ClassVar[str] = "norm_ratio"
    needs_cosine: ClassVar[bool] = True
    static: ClassVar[bool] = False

    def pair(self, policy, state, victims, targets, ok, cos):
        n_j = gather_rows(state.values, victims).norm(dim=-1)[..., None]  # (B, H, R, 1)
        n_t = gather_rows(state.values, targets.flatten(2)).norm(dim=-1).view(targets.shape)  # (B, H, R, K)
        w = cos.clamp_min(0.0) * n_j / (n_j + n_t).clamp_min(1e-12)
        return w[..., None], (1.0 - w)[..., None]


@dataclass(frozen=True)
class VoteWeights(Weights):
    """KeepKV's votes × attention: ((1 + d_j) ā_j, (1 + d_t) ā_t), d the merge depth of each slot."""

    name: ClassVar[str] = "votes"
    static: ClassVar[bool] = False

    def pair(self, policy, state, victims, targets, ok, cos):
        votes = lambda s: 1.0 + state.depth.gather(2, s.flatten(2)).view(s.shape)  # noqa: E731
        w_j = votes(victims) * _average(state, victims)  # (B, H, R)
        return w_j[..., None, None], (votes(targets) * _average(state, targets))[..., None]


@dataclass(frozen=True)
class CamGate(Weights):
    """CaM: w_j = g ~ Bernoulli(clamp(a_j / mean(a over the in-range targets), 0, 1)) (NaN -> 0), and the rule
    v_t + g·v_j / m (targets not renormalised; the divisor stays m when the range is clipped).

    The draw is ``u < p`` with u = uniform(seed, window, layer, head, victim position): a token leaves once.
    """

    m: int = 16
    name: ClassVar[str] = "gate"

    def pair(self, policy, state, victims, targets, ok, cos):
        H = state.positions.shape[1]
        acc_j = state.acc.gather(2, victims)  # (B, H, R)
        acc_t = state.acc.gather(2, targets.flatten(2)).view(targets.shape)  # (B, H, R, M)
        mean = torch.where(ok, acc_t, 0.0).sum(-1) / ok.sum(-1)  # (B, H, R)
        p = torch.nan_to_num(acc_j / mean, nan=0.0).clamp(0.0, 1.0)  # inf -> 1
        heads = torch.arange(H, device=victims.device)[None, :, None]  # (1, H, 1)
        u = uniform(policy.seed, row_ids(state), state.layer, heads, state.positions.gather(2, victims))  # (B, H, R)
        return (u < p)[..., None, None], None  # (B, H, R, 1, 1): the same gate for every target

    def rule(self, w_j, v_j, w_t, v_t, on):
        return v_t + (w_j & on) * v_j / self.m  # on: (B, H, K, 1)


def target_part(name: str, sinks: int, threshold: float | None, m: int) -> Target:
    return {"right": RightNeighbour(), "similar": MostSimilar(sinks, threshold), "next": NextByPosition(m),
            "none": NoTarget()}[name]


def weights_part(name: str, m: int) -> Weights:
    return {"attention": AttentionWeights(), "equal": EqualWeights(), "similarity": SimilarityWeights(),
            "norm_ratio": NormRatioWeights(), "votes": VoteWeights(), "gate": CamGate(m)}[name]
