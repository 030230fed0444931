"""Each shared helper of ``analysis.ops`` (and the compression core's own) on a case worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.compress import LayerState, make_policy
from analysis.ops import (
    FAR,
    attention_scores,
    convex_merge,
    group_mean,
    masked_softmax,
    query_groups,
    relative_error,
    running_mean,
    seen_counts,
    uncompressed_prefix,
    uniform,
)


# --- relative error ----------------------------------------------------------------------------
def test_relative_error_is_the_norm_of_the_difference_over_the_norm_of_the_reference():
    approx = torch.tensor([[4.0, 4.0], [3.0, 4.0]])
    exact = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    assert relative_error(approx, exact).tolist() == pytest.approx([1 / 5, 0.0])  # ||(1, 0)|| / ||(3, 4)||


def test_relative_error_against_a_zero_reference_is_finite():
    error = relative_error(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0]))
    assert float(error) == pytest.approx(5e30)  # 5 / 1e-30, never inf or nan


# --- GQA groups --------------------------------------------------------------------------------
def test_query_groups_puts_adjacent_query_heads_in_one_group():
    heads = torch.tensor([[1.0, 3.0, 5.0, 9.0]])  # (B=1, Hq=4)
    assert query_groups(heads, 2).tolist() == [[[1.0, 3.0], [5.0, 9.0]]]  # (1, H=2, G=2)


def test_group_mean_of_four_query_heads_in_two_groups():
    attn = torch.tensor([1.0, 3.0, 5.0, 9.0], dtype=torch.float64).view(1, 4, 1)  # (B, Hq, T)
    mean = group_mean(attn, 2)
    assert mean.dtype == torch.float32 and mean.shape == (1, 2, 1)
    assert mean.flatten().tolist() == [2.0, 7.0]


def test_group_mean_along_another_axis():
    error = torch.tensor([[[1.0, 3.0, 5.0, 9.0]]]).view(1, 1, 4, 1)  # (J, B, Hq, T)
    assert group_mean(error, 2, dim=2).flatten().tolist() == [2.0, 7.0]
    assert group_mean(error[0, 0], 2, dim=0).flatten().tolist() == [2.0, 7.0]  # (Hq, T)


def test_group_mean_refuses_unequal_groups():
    with pytest.raises(ValueError, match="3 query heads"):
        group_mean(torch.ones(1, 3, 5), 2)


# --- attention softmax -------------------------------------------------------------------------
def test_masked_softmax_gives_a_masked_slot_exactly_zero_weight():
    scores = torch.tensor([0.0, math.log(2.0), 5.0])
    weights = masked_softmax(scores, torch.tensor([True, True, False]))
    assert weights.tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])  # e^0 : e^ln2 = 1 : 2
    assert weights[2].item() == 0.0


def test_masked_softmax_without_mask_and_in_float32():
    scores = torch.tensor([0.0, 0.0], dtype=torch.bfloat16)
    weights = masked_softmax(scores, None, torch.float32)
    assert weights.dtype == torch.float32 and weights.tolist() == [0.5, 0.5]


def test_masked_softmax_of_a_row_with_no_allowed_slot_is_not_a_distribution():
    weights = masked_softmax(torch.zeros(2), torch.tensor([False, False]))
    assert torch.isnan(weights).all()  # callers always allow one slot (the newest token)


# --- running log-perplexity --------------------------------------------------------------------
def test_running_mean_of_one_two_three():
    curve = running_mean(torch.tensor([1.0, 2.0, 3.0]))
    assert curve.dtype == torch.float64 and curve.tolist() == [1.0, 1.5, 2.0]


def test_running_mean_is_per_row():
    curve = running_mean(torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 2.0]]))
    assert curve.tolist() == [[1.0, 1.5, 2.0], [4.0, 2.0, 2.0]]


# --- WeightedKV merge --------------------------------------------------------------------------
def test_convex_merge_with_weights_one_fifth_and_three_fifths():
    w_a, w_b = torch.tensor([0.2]), torch.tensor([0.6])
    v_a, v_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    merged = convex_merge(w_a, v_a, w_b, v_b, torch.tensor(True))
    assert merged.tolist() == pytest.approx([0.25, 0.75])  # (0.2, 0.6) / 0.8


def test_convex_merge_keeps_the_neighbour_when_unweighted_or_inactive():
    v_a, v_b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    zero = torch.tensor([0.0])
    assert convex_merge(zero, v_a, zero, v_b, torch.tensor(True)).tolist() == [0.0, 1.0]  # 0 / 0: v_b
    off = convex_merge(torch.tensor([0.2]), v_a, torch.tensor([0.6]), v_b, torch.tensor(False))
    assert off.tolist() == [0.0, 1.0]


# --- chunked prefill ---------------------------------------------------------------------------
def test_uncompressed_prefix_stops_at_the_smallest_budget():
    assert uncompressed_prefix(64, [32, 16, None]) == 16  # the 16-slot row compresses from token 16
    assert uncompressed_prefix(64, [None]) == 63  # nothing compresses: all but the last token
    assert uncompressed_prefix(10, [100]) == 9  # a budget above the sequence never compresses
    assert uncompressed_prefix(64, []) == 63


# --- cache statistics --------------------------------------------------------------------------
def test_seen_counts_of_two_queries_at_positions_one_and_two():
    positions = torch.tensor([0, 1, 2, -1])  # the last slot is free
    assert seen_counts(positions, 1, 2).tolist() == [2.0, 2.0, 1.0, 0.0]
    # a window of 2: query p sees key k iff p - 2 < k <= p, so query 2 no longer sees position 0
    assert seen_counts(positions, 1, 2, window=2).tolist() == [1.0, 2.0, 1.0, 0.0]


def _hash(*keys: int) -> float:
    """``uniform`` in plain Python integers."""
    h = 0
    for key in keys:
        for _ in range(2):
            h = ((h ^ (key & 0x7FFFFFFF)) * 1540483477 + 0x2545F491) % 2147483647
            h ^= h >> 13
    return h / 2147483647.0


def test_uniform_is_the_counter_hash_whatever_the_batch():
    row = uniform(7, 3, torch.arange(5))  # (5,): five slots at once
    assert row.tolist() == pytest.approx([_hash(7, 3, i) for i in range(5)], abs=1e-7)
    assert float(uniform(7, 3, 4)) == row[4].item()  # one draw alone is the same draw
    assert ((row >= 0) & (row < 1)).all()


# --- compression core --------------------------------------------------------------------------
def test_by_position_lists_held_slots_oldest_first_then_free_ones():
    state = LayerState.empty(torch.zeros(1, 1, 0, 2), torch.zeros(1, 1, 0, 2), capacity=4)
    state.positions = torch.tensor([[[5, -1, 2, 7]]])
    assert state.by_position().tolist() == [[[2, 0, 3, 1]]]
    assert FAR > 2**40  # the free slot's sort key is beyond any position


def test_candidate_scores_are_infinite_outside_the_candidates():
    state = LayerState.empty(torch.zeros(1, 1, 0, 2), torch.zeros(1, 1, 0, 2), capacity=6)
    state.append(torch.zeros(1, 1, 6, 2), torch.zeros(1, 1, 6, 2))  # positions 0..5, all scores 0
    policy = make_policy("weightedkv", 5, sinks=1, recent=2)  # candidates: 1 <= position < 6 - 2
    scores = policy._candidate_scores(state)
    assert scores.tolist() == [[[math.inf, 0.0, 0.0, 0.0, math.inf, math.inf]]]
    assert policy.select(state).tolist() == [[1]]  # ties: the lowest slot


# --- attention scores --------------------------------------------------------------------------
def test_attention_scores_divide_by_sqrt_d_or_multiply_by_the_given_scaling():
    q = torch.tensor([[1.0, 0.0]])  # (Q=1, D=2)
    k = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # (L=2, D=2)
    assert attention_scores(q, k)[0].tolist() == pytest.approx([math.sqrt(2.0), 0.0])  # 2 / sqrt(2)
    assert attention_scores(q, k, 0.5).tolist() == [[1.0, 0.0]]
