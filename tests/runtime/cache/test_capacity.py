"""The cache held in place at a fixed capacity, per-head plans, no host sync, model-level behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.jobs import Job, Plan
from analysis.runtime.cache import CompressedCache, restore

BUDGET, SINKS = 16, 4


def gen(model, ids, cache, new=8):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


# --- plans ------------------------------------------------------------------------------------------
def test_uniform_plan_is_exactly_the_uniform_budget(llama, random_ids):
    ids = random_ids(2, 30, seed=1)
    with CompressedCache(llama, "weightedkv", BUDGET, sinks=SINKS) as a:
        out_a = gen(llama, ids, a, new=12)
    with CompressedCache(llama, "weightedkv", plan=Plan.uniform(4, 2, BUDGET, sinks=SINKS)) as b:
        out_b = gen(llama, ids, b, new=12)
    assert torch.equal(out_a, out_b)
    for layer in range(4):
        assert torch.equal(a.kept_positions(layer), b.kept_positions(layer))
        assert torch.equal(a.layers[layer].state.values, b.layers[layer].state.values)


def test_per_head_budgets_hold_and_free_slots_get_zero_weight(llama, random_ids):
    budgets = [[8, 20], [12, 12], [20, 8], [9, 14]]
    plan = Plan(budgets, sinks=2, merge=[[True, False]] * 4)
    seen_weights = []
    with CompressedCache(llama, "weightedkv", plan=plan) as cache:
        layer = cache.layers[0]
        real = layer.after_attention

        def spy(weights):
            seen_weights.append((weights.clone(), layer.state.valid.clone()))
            real(weights)

        layer.after_attention = spy
        gen(llama, random_ids(2, 24, seed=2), cache, new=10)
    for i, row in enumerate(budgets):
        held = cache.layers[i].state.n_valid()  # (B, H)
        assert held.tolist() == [row, row]  # each head at its own budget
    free_weight = [w.view(2, 2, 2, *w.shape[2:])[:, :, :, :, :][
                       ~v[:, :, None, None, :].expand(-1, -1, 2, w.shape[2], -1)]
                   for w, v in seen_weights]
    assert sum(x.numel() for x in free_weight) > 0  # there were free slots while attending
    assert all(bool((x == 0).all()) for x in free_weight)  # exactly zero weight on them
    memory = cache.memory()
    slot_bytes = 2 * 16 * 4  # key + value, head_dim 16, float32
    assert memory["logical_bytes"] == 2 * sum(map(sum, budgets)) * slot_bytes  # 2 rows
    assert memory["physical_bytes"] == sum(2 * 2 * (max(row) + 1) * slot_bytes for row in budgets)


def test_bad_plans(llama, tmp_path):
    with pytest.raises(UserError, match="3 layers x 2 KV heads, but the model has 4 x 2"):
        CompressedCache(llama, "weightedkv", plan=Plan([[16, 16]] * 3))
    with pytest.raises(UserError, match="floor is 5"):
        Plan([[16, 4]] * 4, sinks=4)
    with pytest.raises(UserError, match="one decision per layer"):
        CompressedCache(llama, "tova", plan=Plan([[16, 20]] * 4))
    with pytest.raises(UserError, match="more than --total-budget 100"):
        Plan.uniform(4, 2, 16).check_total(100)
    (tmp_path / "p.json").write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        Plan.load(tmp_path / "p.json")
    plan = Plan.uniform(4, 2, 16, name="u")
    assert Plan.load(plan.save(tmp_path / "u.json")) == plan
    assert json.loads((tmp_path / "u.json").read_text())["total_slots"] == 128


def test_a_job_is_the_method_name_built_once(llama, random_ids):
    """CompressedCache(model, job) holds exactly what the name, options and plan it was built from hold."""
    ids, plan = random_ids(2, 30, seed=1), Plan([[8, 20], [12, 12], [20, 8], [9, 14]], sinks=2)
    job = Job.of("weightedkv", None, PolicyOptions(sinks=2), plan)
    with CompressedCache(llama, "weightedkv", plan=plan, sinks=2) as by_name, CompressedCache(llama, job) as by_job:
        assert torch.equal(gen(llama, ids, by_name, new=12), gen(llama, ids, by_job, new=12))
    for layer in range(4):
        assert torch.equal(by_name.kept_positions(layer), by_job.kept_positions(layer))
    assert by_job.policy is job.policy
    with pytest.raises(UserError, match="a Job carries its own plan"):
        CompressedCache(llama, job, plan=plan)
    with pytest.raises(UserError, match="a Job carries its own"):
        CompressedCache(llama, job, sinks=2)
    with pytest.raises(UserError, match=r"unknown CompressedCache option\(s\) \['sink'\]; valid: sinks, recent, seed"):
        CompressedCache(llama, "weightedkv", 16, sink=2)


# --- the cache over several generate() calls and prompts ----------------------------------------------
def test_second_generate_continues_the_conversation(llama, random_ids):
    """A chat: turn 1, then turn 2 on the same cache, equals the whole conversation run as one sequence."""
    first, second = random_ids(1, 12, seed=3), random_ids(1, 6, seed=4)
    with CompressedCache(llama, "full", None) as cache:
        turn1 = gen(llama, first, cache, new=5)
        convo = torch.cat([turn1, second], dim=1)
        turn2 = gen(llama, convo, cache, new=5)
    assert cache.get_seq_length() == convo.shape[1] + 5 - 1
    assert torch.equal(turn2, gen(llama, convo, None, new=5))
    with CompressedCache(llama, "weightedkv", BUDGET, sinks=SINKS) as compressed:  # runs, positions keep counting
        out = gen(llama, torch.cat([gen(llama, first, compressed, new=12), second], 1), compressed, new=5)
    assert out.shape[1] == 12 + 12 + 6 + 5 and compressed.get_seq_length() == out.shape[1] - 1


def test_long_prompt_is_compressed_in_one_pass_and_memory_given_back(llama, random_ids):
    ids = random_ids(1, 120, seed=5)
    with CompressedCache(llama, "weightedkv", BUDGET, sinks=SINKS) as cache:
        gen(llama, ids, cache, new=3)
    state = cache.layers[1].state
    assert state.capacity == BUDGET + 1 and int(state.n_valid().max()) == BUDGET


# --- the per-step path: in place and static (no host synchronisation: tests/runtime/cache/test_no_sync.py) -----------
def decode(model, cache, ids, t):
    with torch.no_grad():
        model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((ids.shape[0], 1), t), use_cache=True)


@pytest.mark.parametrize("method", ["weightedkv", "cam", "h2o", "tova", "random", "streaming_llm"])
def test_decode_steps_are_in_place_and_static(llama, random_ids, method):
    ids = random_ids(2, 40, seed=6)
    with CompressedCache(llama, method, BUDGET, sinks=SINKS) as cache:
        with torch.no_grad():
            llama(ids[:, :20], past_key_values=cache, position_ids=torch.arange(20).expand(2, 20), use_cache=True)
        decode(llama, cache, ids, 20)
        state = cache.layers[2].state
        pointers = (state.keys.data_ptr(), state.values.data_ptr(), state.positions.data_ptr())
        shapes = (state.keys.shape, state.acc.shape)
        for t in range(21, 30):
            decode(llama, cache, ids, t)
        assert (state.keys.data_ptr(), state.values.data_ptr(), state.positions.data_ptr()) == pointers
        assert (state.keys.shape, state.acc.shape) == shapes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_one_decode_step_replays_in_a_cuda_graph(llama, random_ids):
    model = llama.to("cuda")
    ids = random_ids(1, 40, seed=7).cuda()
    try:
        caches = []
        for _ in range(2):
            cache = CompressedCache(model, "weightedkv", BUDGET, sinks=SINKS)
            with torch.no_grad():
                model(ids[:, :30], past_key_values=cache, position_ids=torch.arange(30, device="cuda")[None],
                      use_cache=True)
            caches.append(cache)
        step = ids[:, 30:31]
        position = torch.full((1, 1), 30, device="cuda")
        with torch.no_grad():
            eager = model(step, past_key_values=caches[0], position_ids=position, use_cache=True).logits
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # capture records the step's kernels on caches[1]'s buffers without running them: its
            # slots are still those before the step when the graph is replayed
            with torch.cuda.graph(graph):
                captured = model(step, past_key_values=caches[1], position_ids=position, use_cache=True).logits
            graph.replay()
            torch.cuda.synchronize()
        torch.testing.assert_close(captured, eager)
    finally:
        restore(model)
        model.to("cpu")


# --- models with sliding-window layers ----------------------------------------------------------------
def tiny_gemma3():

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                              max_position_embeddings=256, query_pre_attn_scalar=16,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    return Gemma3ForCausalLM(config).eval().to(torch.float32)


def test_gemma3_sliding_layers_keep_their_window_and_full_equals_generate(random_ids):
    model = tiny_gemma3()
    model.set_attn_implementation("eager")
    ids = random_ids(2, 20, seed=8)
    plain = gen(model, ids, None, new=8)
    assert torch.equal(gen(model, ids, CompressedCache(model, "full", None), new=8), plain)
    with CompressedCache(model, "weightedkv", 12, sinks=2) as cache:
        out = gen(model, ids, cache, new=8)
    assert type(cache.layers[0]).__name__ == "DynamicSlidingWindowLayer"
    assert cache.occupancy()[1] == 12 and cache.occupancy()[3] == 12  # full-attention layers compressed
    assert out.shape == plain.shape


@pytest.mark.parametrize("method", ["weightedkv", "cam"])
def test_tracked_mixtures_reproduce_every_slot_value(llama, random_ids, method):
    """Layer 0's values depend only on the tokens, so each slot's value must be its mixture of the originals."""
    ids = random_ids(2, 40, seed=9)
    with CompressedCache(llama, method, BUDGET, sinks=SINKS, track_mixing=40) as cache:
        out = gen(llama, ids, cache, new=10)
    state = cache.layers[0].state
    with torch.no_grad():
        original = llama(out[:, :-1], use_cache=True).past_key_values.layers[0].values  # (B, H, T, D)
    T = original.shape[2]
    mixing = state.mixing[..., :T]  # (B, H, C, T)
    rebuilt = mixing @ original  # (B, H, C, D)
    held = state.valid[..., None]
    assert ((rebuilt - state.values).abs() * held).max() < 1e-4
    merged = (mixing > 0).sum(-1)[state.valid]
    if method == "weightedkv":
        assert merged.max() >= 3  # cascaded merges are visible in the mixtures
        torch.testing.assert_close(mixing.sum(-1)[state.valid], torch.ones(int(state.valid.sum())))  # convex
