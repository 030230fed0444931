"""Ties are broken by position, as Algorithm 1's argmin over positions does, on every selection path.

Slots are reused once tokens are evicted, so slot order is not position order: a tie broken by slot
picks a younger token. The states here are hand-made with slots out of position order and every
score equal (attention weights that underflow to 0 in float16 tie exactly like this).
"""

from __future__ import annotations

import pytest
import torch

from analysis.compress import METHODS, LayerState, RowPolicies, make_policy

# slot -> position: 10 tokens, slot order scrambled; position 9 is the newest
SLOTS = [0, 9, 5, 2, 7, 1, 8, 3, 6, 4]
SINKS, RECENT, BUDGET = 1, 1, 6
TIED = [n for n, cls in METHODS.items() if cls.compresses and n != "random"]  # random draws never tie


def tied_state(batch: int = 1, heads: int = 2) -> LayerState:
    """Every slot held, every statistic equal: each candidate scores the same under every scored method."""
    C = len(SLOTS)
    state = LayerState.empty(torch.zeros(batch, heads, 0, 4), torch.zeros(batch, heads, 0, 4), C)
    state.positions = torch.tensor(SLOTS).expand(batch, heads, C).clone()
    state.keys.normal_(generator=torch.Generator().manual_seed(0))
    state.values.normal_(generator=torch.Generator().manual_seed(1))
    state.acc.fill_(0.5)
    state.count.fill_(4.0)
    state.last.fill_(0.1)
    state.step.fill_(C)
    state.seen = state.max_valid = C
    return state


def slot_of(position: int) -> int:
    return SLOTS.index(position)


@pytest.mark.parametrize("method", TIED)
def test_one_step_takes_the_oldest_tied_candidate(method):
    """Candidates are positions 1..8 (1 sink, 1 recent); all tie, so position 1 goes, in slot 5 (not slot 2)."""
    policy = make_policy(method, BUDGET, SINKS, RECENT)
    state = tied_state()
    assert torch.equal(policy.select(state), torch.full((1, 2), slot_of(1)))
    state.pending = 1  # a decoding step: the cache is over its budget by one
    state.max_valid = BUDGET + 1  # rounds = 1: the per-step path
    state.positions[..., [slot_of(p) for p in (6, 7, 8)]] = -1  # held: 0..5 and 9 (7 tokens, budget 6)
    policy.compress(state)
    assert sorted(state.positions[0, 0][state.positions[0, 0] >= 0].tolist()) == [0, 2, 3, 4, 5, 9]


@pytest.mark.parametrize("method", TIED)
def test_the_long_prompt_pass_ranks_ties_by_position(method):
    """Four victims of a ranked pass, all tied: positions 1, 2, 3, 4 go (a slot-ordered rank took 5, 2, 7, 1)."""
    policy = make_policy(method, BUDGET, SINKS, RECENT)
    state = tied_state()
    state.pending = len(SLOTS)
    policy.compress(state)
    kept = state.positions[state.positions >= 0].view(1, 2, BUDGET)
    assert kept.sort(dim=-1).values.tolist() == [[[0, 5, 6, 7, 8, 9]] * 2]


def test_packed_rows_break_ties_by_position_in_every_row():
    policies = [make_policy(n, BUDGET, SINKS, RECENT) for n in TIED]
    rows = RowPolicies(policies=policies, rows=list(range(len(TIED))))
    state = tied_state(batch=len(TIED))
    assert torch.equal(rows.select(state), torch.full((len(TIED), 2), slot_of(1)))


def test_a_lower_score_still_beats_an_older_position():
    """Position only breaks ties: an unequal score decides first (H2O: the least attended goes)."""
    policy = make_policy("h2o", BUDGET, SINKS, RECENT)
    state = tied_state()
    state.acc[0, 1, slot_of(7)] = 0.25  # head 1's position 7 is the least attended
    assert policy.select(state).tolist() == [[slot_of(1), slot_of(7)]]
