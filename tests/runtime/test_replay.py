"""analysis.runtime.replay on a tiny llama: the replay is the real cache, victims obey the policy, mixtures add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.compress import make_policy
from analysis.errors import UserError
from analysis.models.loading import LoadedModel
from analysis.runtime.cache import CompressedCache
from analysis.runtime.capture import capture_sequences
from analysis.runtime.replay import merge_preview, replay, right_neighbour

T, BUDGET, LAYER = 40, 12, 2


@pytest.fixture(scope="module")
def tokens(random_ids):
    return random_ids(1, T, seed=3)[0].tolist()


@pytest.fixture(scope="module")
def weighted(tiny_model, tokens):
    return replay(tiny_model("llama"), tokens, make_policy("weightedkv", BUDGET), LAYER, keep_values=True)


def test_replay_holds_what_the_cache_holds(tiny_model, tokens, weighted):
    """The last step equals a CompressedCache fed the same tokens one at a time, every layer decoded."""

    model = tiny_model("llama")
    cache = CompressedCache(model, "weightedkv", BUDGET)
    with torch.inference_mode():
        for t, token in enumerate(tokens):
            model(torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[t]]), use_cache=True)
    kept = cache.kept_positions(LAYER)[0]  # (H, C)
    assert [sorted(p for p in row.tolist() if p >= 0) for row in kept] == [h.positions for h in weighted.steps[-1]]
    assert len(weighted.steps) == T and weighted.heads == 2


def test_victims_and_merge_targets_follow_weightedkv(weighted):
    sinks, recent = weighted.sinks, weighted.recent
    for t, heads in enumerate(weighted.steps):
        for h, now in enumerate(heads):
            assert len(now.positions) == min(t + 1, BUDGET)
            if t < BUDGET:
                assert now.evicted is None and not now.merged_into
                continue
            before = weighted.steps[t - 1][h].positions + [t]
            assert now.evicted in before and now.evicted not in now.positions
            index = before.index(now.evicted)
            assert sinks <= index < len(before) - recent  # never a sink, never the recent window
            assert now.merged_into in ([before[index + 1]], [])  # the right neighbour (or nothing: ā sum 0)
    assert weighted.next_merge(BUDGET - 1, 0) == (weighted.steps[BUDGET][0].evicted,
                                                   weighted.steps[BUDGET][0].merged_into)


def test_mixtures_reproduce_the_cached_values(weighted):
    """Each held value = its mixture's weights times the original values; WeightedKV's are convex."""
    for h in range(weighted.heads):
        originals = np.stack([weighted.values[t][h][weighted.steps[t][h].positions.index(t)] for t in range(T)])
        mix = weighted.mixing[-1][h]  # (slots, T)
        assert mix.shape == (BUDGET, T) and (mix >= -1e-6).all()
        np.testing.assert_allclose(mix.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(mix @ originals, weighted.values[-1][h], atol=1e-4)
    assert max(int((m > 0).sum(axis=1).max()) for m in weighted.mixing[-1]) > 2  # merges did cascade


def test_eviction_keeps_untouched_values(tiny_model, tokens):
    rep = replay(tiny_model("llama"), tokens, make_policy("weightedkv_evict", BUDGET), LAYER)
    assert all(not h.merged_into for heads in rep.steps for h in heads)
    assert all(((m > 0).sum(axis=1) == 1).all() for m in rep.mixing[-1])


def test_merge_preview_is_the_lowest_average_attention_candidate(tiny_model, tokens):

    loaded = LoadedModel(tiny_model("llama"), None, "tiny", torch.device("cpu"), torch.float32)
    capture = capture_sequences(loaded, [("s", tokens)], progress=False)
    score = capture.get(LAYER, "attn_received_kv")[0] / capture.get(LAYER, "attn_count")[0]  # (H, T)
    sinks, recent = 4, BUDGET // 2 - 4
    for h, (victim, into) in enumerate(merge_preview(capture, LAYER, make_policy("weightedkv", BUDGET))):
        assert victim == sinks + int(score[h, sinks : T - recent].argmin())
        assert into == [victim + 1]


def test_bad_input(tiny_model, tokens):
    with pytest.raises(UserError, match="layer 9"):
        replay(tiny_model("llama"), tokens, make_policy("weightedkv", BUDGET), 9)
    with pytest.raises(UserError, match="give a configured policy"):
        replay(tiny_model("llama"), tokens, "weightedkv", LAYER)  # a name: the pages build the policy
    with pytest.raises(UserError, match="at least one token"):
        replay(tiny_model("llama"), [], make_policy("weightedkv", BUDGET), LAYER)


def test_a_similarity_merge_is_shown_beside_the_right_neighbour(tiny_model, tokens, weighted):
    """right_neighbour is WeightedKV's target; weightedkv_similar removes the same kind of victim but
    merges into a held slot that is, at some step, not that neighbour."""
    for t in range(BUDGET, T):
        for h, now in enumerate(weighted.steps[t]):
            if now.merged_into:
                assert now.merged_into == [right_neighbour(weighted, t, h)]
    similar = replay(tiny_model("llama"), tokens, make_policy("weightedkv_similar", BUDGET), LAYER)
    elsewhere = 0
    for t in range(BUDGET, T):
        for h, now in enumerate(similar.steps[t]):
            assert len(now.merged_into) <= 1 and now.evicted not in now.merged_into
            assert set(now.merged_into) <= set(now.positions)
            elsewhere += bool(now.merged_into) and now.merged_into != [right_neighbour(similar, t, h)]
    assert elsewhere > 0
    assert right_neighbour(weighted, 0, 0) is None  # nothing removed yet
