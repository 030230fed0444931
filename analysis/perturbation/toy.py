"""The WeightedKV paper's Fig. 3 toy example, replayed step by step through the real policy.

One (row, head), m = 4, no sinks and no recent window. Token i's value is the one-hot e_i, so a
slot's value *is* its mixture: the weight of each original token in it. The paper prints only the
average attention ā of every held token at every step; the replay installs real statistics that give
exactly those averages (a slot at position p has been seen n = step - p times, and a = ā · n), then
calls ``WeightedKV.compress`` (the same code every cache uses). What a step did is read off the
state before and after: the position that disappeared is the victim, the slot whose value changed
is the neighbour it was merged into.

Step 5's printed order is illegible: v2 = .1 and v3 = .5 are fixed by the text; v1, v4, v5 take
.3, .3, .5 (only v2's unique minimum and the v2/v3 weights matter, so any such order replays the same).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from analysis.compress import LayerState
from analysis.compress.weightedkv import WeightedKV

BUDGET = 4


TOKENS = 8


# ā of the held tokens, oldest first, at each of the 8 steps (paper Fig. 3)
PAPER_SCORES = [[1.0], [0.8, 0.5], [0.5, 0.3, 0.9], [0.4, 0.2, 0.7, 0.6], [0.3, 0.1, 0.5, 0.3, 0.5],
                [0.3, 0.4, 0.2, 0.3, 0.9], [0.3, 0.4, 0.2, 0.5, 0.7], [0.2, 0.4, 0.3, 0.4, 0.6]]  # fmt: skip


@dataclass
class Step:
    step: int  # 1-based: token ``step`` (position step - 1) has just arrived
    held: list[int]  # positions held after the append, before compression (oldest first)
    scores: list[float]  # ā of each held position
    victim: int | None  # position removed by the compression (None: within budget)
    neighbour: int | None  # position whose value absorbed the victim's (None: evicted or no step)
    weights: tuple[float, float] | None  # (victim, neighbour) share of the merged value
    kept: list[int]  # positions held after compression
    mixtures: list[list[float]]  # per kept slot: weight of each original token (TOKENS long)
    merges: dict[int, int] = field(default_factory=dict)  # kept position -> merges it has absorbed


def held_tokens(state: LayerState) -> tuple[list[int], Tensor]:
    """(positions, values (L, D)) of row 0, head 0, oldest first: the only place the replay reads the state."""
    dense = state.ordered()  # dense, position-sorted copy of the valid slots (core v2)
    return dense.positions[0, 0].tolist(), dense.values[0, 0].clone()


def _by_position(state: LayerState, per_position: dict[int, float]) -> Tensor:
    """(1, 1, C) statistic holding ``per_position[p]`` in the slot of position p (free slots: 0)."""
    out = torch.zeros(state.positions.shape)
    for slot, pos in enumerate(state.positions[0, 0].tolist()):
        if pos >= 0:
            out[0, 0, slot] = per_position[pos]
    return out


def toy_replay(scores: list[list[float]] = PAPER_SCORES, budget: int = BUDGET, seed: int = 3) -> list[Step]:
    """Feed the toy example to ``WeightedKV(budget, sinks=0, recent=0)``; one ``Step`` per token."""
    policy = WeightedKV(budget=budget, sinks=0, recent=0)
    tokens = len(scores)
    eye = torch.eye(tokens)  # value of token i is e_i
    keys = torch.randn(1, 1, tokens, 5, generator=torch.Generator().manual_seed(seed))  # never read by the merge
    state = LayerState.empty(keys, eye[None, None])
    merges: dict[int, int] = {}
    steps = []
    for step, avg in enumerate(scores, start=1):
        state.append(keys[:, :, step - 1 : step], eye[None, None, step - 1 : step], torch.tensor([step - 1]))
        held, before = held_tokens(state)
        if len(avg) != len(held):
            raise ValueError(f"step {step}: {len(avg)} scores for {len(held)} held tokens")
        count = {p: float(step - p) for p in held}  # seen by every query from its own on
        state.count = _by_position(state, count)
        state.acc = _by_position(state, {p: a * count[p] for p, a in zip(held, avg)})
        policy.compress(state)
        kept, after = held_tokens(state)
        gone = [p for p in held if p not in kept]
        victim = gone[0] if gone else None
        neighbour, weights = None, None
        for row, p in enumerate(kept):
            if not torch.allclose(after[row], before[held.index(p)]):
                neighbour = p
                merges[p] = merges.get(p, 0) + 1  # the paper's primes count merges into the slot itself
                avg_of = dict(zip(held, avg))
                total = avg_of[victim] + avg_of[p]
                weights = (avg_of[victim] / total, avg_of[p] / total)
        if victim is not None:
            merges.pop(victim, None)
        steps.append(Step(step, held, list(avg), victim, neighbour, weights, kept,
                          [after[row, :tokens].tolist() for row in range(len(kept))], dict(merges)))
    return steps


def label(position: int, merges: int = 0) -> str:
    """v3, v3′, v3″ ...: token position + 1, one prime per merge absorbed."""
    return f"v{position + 1}" + ("″" * (merges // 2) + "′" * (merges % 2))
