"""analysis.runtime.cache.CompressedCache inside ``generate()`` and a hand-written decode loop."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from analysis.compress import METHODS
from analysis.errors import UserError
from analysis.runtime.cache import CompressedCache
from analysis.text.corpora import load_documents, token_sequences

BUDGET, SINKS = 16, 4
RECENT = BUDGET // 2 - SINKS  # the default split
EVICT_ONLY = ("streaming_llm", "h2o", "tova", "weightedkv_evict", "random")


class Occupancy(StoppingCriteria):
    """Records the largest per-layer occupancy after every generation step; never stops."""

    def __init__(self, cache):
        self.cache, self.steps = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        self.steps.append(max(self.cache.occupancy()))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(model, ids, cache=None, new=8, sample=False, seed=0, criteria=None):
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                  do_sample=sample, pad_token_id=0)
    if sample:
        kwargs.update(top_k=0, temperature=1.0)
    if cache is not None:
        kwargs["past_key_values"] = cache
    if criteria is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([criteria])
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def books(embedded):

    seqs = token_sequences(embedded.tokenizer, load_documents(corpus="books"), 40, 3)
    return torch.tensor([ids for _, ids in seqs])  # (3, 40): three different real texts


# --- FullKV is plain generate ------------------------------------------------------------------------
def test_full_cache_generate_equals_plain_generate_tiny(llama, random_ids):
    ids = random_ids(2, 24, seed=5)
    cache = CompressedCache(llama, "full", None)
    out = generate(llama, ids, cache, new=12)
    assert torch.equal(out, generate(llama, ids, new=12))
    assert cache.occupancy() == [24 + 12 - 1] * llama.config.num_hidden_layers


@pytest.mark.slow
def test_full_cache_generate_equals_plain_generate_embedded(embedded, books):
    ids = books[:2, :32]
    out = generate(embedded.model, ids, CompressedCache(embedded.model, "full", None), new=8)
    assert torch.equal(out, generate(embedded.model, ids, new=8))


# --- every method keeps to the budget ---------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_generates_within_budget(llama, random_ids, method):
    ids = random_ids(2, 24, seed=6)
    cache = CompressedCache(llama, method, BUDGET, sinks=SINKS)
    occupancy = Occupancy(cache)
    out = generate(llama, ids, cache, new=10, sample=True, seed=1, criteria=occupancy)
    assert out.shape == (2, 34) and torch.equal(out[:, :24], ids)
    assert len(occupancy.steps) == 10
    seen = 24 + 10 - 1
    if method == "full":
        assert occupancy.steps == list(range(24, 34)) and cache.occupancy() == [seen] * 4
        return
    assert occupancy.steps == [BUDGET] * 10  # the 24-token prefill is cut straight to the budget
    assert cache.occupancy() == [BUDGET] * 4
    for layer in range(4):
        kept = cache.kept_positions(layer)
        assert kept.shape == (2, 2, BUDGET + 1)  # fixed capacity: the budget + the incoming token's slot
        assert (kept[..., BUDGET:] == -1).all()  # ... which is free between steps
        kept = kept[..., :BUDGET]
        assert torch.all(kept[..., 1:] > kept[..., :-1])  # distinct positions
        assert torch.equal(kept[..., :SINKS], torch.arange(SINKS).expand(2, 2, SINKS))  # sinks
        recent = torch.arange(seen - RECENT, seen).expand(2, 2, RECENT)
        assert torch.equal(kept[..., -RECENT:], recent)  # the recent window
        assert kept.max() == seen - 1 and kept.min() == 0


def test_budget_holds_in_a_decode_loop_with_explicit_positions(llama, random_ids):
    """Prefill under the budget, then one token per call: occupancy = min(tokens, budget) always."""
    ids = random_ids(2, 40, seed=7)
    cache = CompressedCache(llama, "weightedkv", BUDGET, sinks=SINKS)
    with torch.no_grad():
        llama(ids[:, :6], past_key_values=cache, position_ids=torch.arange(6).expand(2, 6), use_cache=True)
        assert cache.occupancy() == [6] * 4
        for t in range(6, 40):
            llama(ids[:, t:t + 1], past_key_values=cache, position_ids=torch.full((2, 1), t), use_cache=True)
            assert cache.occupancy() == [min(t + 1, BUDGET)] * 4, t
    kept = cache.kept_positions(0)[..., :BUDGET]
    assert torch.equal(kept[..., :SINKS], torch.arange(SINKS).expand(2, 2, SINKS))
    assert torch.equal(kept[..., -RECENT:], torch.arange(40 - RECENT, 40).expand(2, 2, RECENT))


@pytest.mark.parametrize("method", EVICT_ONLY)
def test_evicting_methods_keep_the_original_rotated_keys(llama, random_ids, method):
    """Layer 0's keys depend only on token and position, so what an evicting cache keeps after
    generate() must be the full cache's layer-0 keys and values at the kept positions: this checks
    that generate() rotates new keys to their true positions after compression."""
    ids = random_ids(2, 24, seed=8)
    cache = CompressedCache(llama, method, BUDGET, sinks=SINKS)
    out = generate(llama, ids, cache, new=6, sample=True, seed=2)
    with torch.no_grad():
        full = llama(out[:, :-1], use_cache=True).past_key_values.layers[0]
    state = cache.layers[0].state
    held = state.valid[..., None]  # (B, H, C, 1): slots holding a token, in no particular order
    index = state.positions.clamp_min(0)[..., None].expand(*state.positions.shape, full.keys.shape[-1])
    assert int(state.valid.sum()) == 2 * 2 * BUDGET
    assert ((state.keys - full.keys.gather(2, index)).abs() * held).max() <= 1e-5
    assert ((state.values - full.values.gather(2, index)).abs() * held).max() <= 1e-5


# --- batch rows are independent ------------------------------------------------------------------------------
def test_rows_do_not_leak_tiny(llama, random_ids):
    a, b, c = random_ids(3, 24, seed=9)
    outs, kept = [], []
    for other in (b, c):
        cache = CompressedCache(llama, "weightedkv", BUDGET, sinks=SINKS)
        outs.append(generate(llama, torch.stack([a, other]), cache, new=10))
        kept.append(cache.kept_positions(2))
    assert not torch.equal(outs[0][1], outs[1][1])  # the other row really differs
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(kept[0][0], kept[1][0])
    alone = generate(llama, a[None], CompressedCache(llama, "weightedkv", BUDGET, sinks=SINKS), new=10)
    assert torch.equal(alone[0], outs[0][0])


@pytest.mark.slow
def test_rows_do_not_leak_embedded(embedded, books):
    model = embedded.model
    outs, kept = [], []
    for other in (books[1], books[2]):
        cache = CompressedCache(model, "weightedkv", BUDGET, sinks=SINKS)
        outs.append(generate(model, torch.stack([books[0], other]), cache, new=6))
        assert max(cache.occupancy()) == BUDGET
        kept.append(cache.kept_positions(5))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(kept[0][0], kept[1][0])


# --- attention implementation -----------------------------------------------------------------------------------
def test_sdpa_model_switches_while_the_cache_is_open_and_is_restored(tiny_model, llama, random_ids):
    sdpa = tiny_model("llama", "sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in sdpa.modules())
    with pytest.warns(UserWarning, match="kvlens's eager attention instead of sdpa until the cache is closed"):
        cache = CompressedCache(sdpa, "weightedkv", BUDGET, sinks=SINKS)
    assert sdpa.config._attn_implementation == "kvlens"
    ids = random_ids(2, 24, seed=10)
    with cache:
        out = generate(sdpa, ids, cache, new=6)
    with CompressedCache(llama, "weightedkv", BUDGET, sinks=SINKS) as other:
        same = generate(llama, ids, other, new=6)
    assert torch.equal(out, same)  # same seeded weights: same tokens under kvlens's eager attention
    assert cache.occupancy() == [BUDGET] * 4
    assert sdpa.config._attn_implementation == "sdpa" and llama.config._attn_implementation == "eager"
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in sdpa.modules()) == hooks


def test_full_cache_needs_no_switch(tiny_model):
    sdpa = tiny_model("gpt2", "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressedCache(sdpa, "full", None)
    assert sdpa.config._attn_implementation == "sdpa"


def test_unsupported_generation_modes_and_bad_budget(llama, random_ids):
    with pytest.raises(UserError, match="unknown compression method"):
        CompressedCache(llama, "nope", BUDGET)
    with pytest.raises(UserError, match="no room to compress"):
        CompressedCache(llama, "weightedkv", 8, sinks=4, recent=4)
    ids = random_ids(1, 24, seed=11)
    for method in ("full", "h2o"):  # beam search would silently mix beams: it must be refused
        with pytest.raises(UserError, match="does not support beam search"), torch.no_grad():
            llama.generate(ids, attention_mask=torch.ones_like(ids),
                           past_key_values=CompressedCache(llama, method, BUDGET),
                           max_new_tokens=6, num_beams=4, do_sample=False, pad_token_id=0)
