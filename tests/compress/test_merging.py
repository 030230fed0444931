"""The merge design space: presets equal today's methods bit for bit, each part on a hand-worked case, bad specs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from analysis.compress import LayerState, make_policy
from analysis.compress.merge_parts import MostSimilar, NormRatioWeights
from analysis.compress.merging import MergeSpec
from analysis.compress.registry import PRESETS, policy_class
from analysis.errors import UserError
from analysis.models.loading import LoadedModel
from analysis.options import parse_names
from analysis.perturbation.study import Settings, run_study
from analysis.report.merges import fig_space
from analysis.report.save import save_study
from analysis.runtime.cache import CompressedCache
from analysis.text.corpora import load_documents, token_sequences
from tests.app.test_dashboard import app, titles
from tests.compress.legacy_merges import LegacyCaM, LegacyWeightedKV, LegacyWeightedKVEvict
from tests.compress.test_policies import causal_attn, chunks, to_slots


# --- bit for bit against today's code, on the real model ---------------------------------------------------
def decode(model, ids, policy, prompt: int):
    """Logits of a ``prompt``-token forward (the long-prompt, ranked path) then one token at a time, and the states."""
    b, W = ids.shape
    with torch.inference_mode(), CompressedCache(model, policy) as cache:
        logits = [model(ids[:, :prompt], past_key_values=cache, position_ids=torch.arange(prompt).expand(b, -1),
                        use_cache=True).logits]
        for t in range(prompt, W):
            logits.append(model(ids[:, t:t + 1], past_key_values=cache, position_ids=torch.full((b, 1), t),
                                use_cache=True).logits)
        states = [layer.state for layer in cache.layers if getattr(layer, "state", None) is not None]
    return torch.cat(logits, 1), states


@pytest.mark.slow
@pytest.mark.parametrize("method, legacy", [("weightedkv", LegacyWeightedKV), ("cam", LegacyCaM),
                                            ("weightedkv_evict", LegacyWeightedKVEvict)])
def test_space_points_equal_todays_methods_bit_for_bit(embedded, method, legacy):
    seqs = token_sequences(embedded.tokenizer, load_documents(corpus="books"), 40, 1)
    ids = torch.tensor([s for _, s in seqs])  # (1, 40): 12 victims in the prompt's pass, then 16 steps
    kwargs = {"merge_num": 4, "seed": 3} if method == "cam" else {}
    new, new_states = decode(embedded.model, ids, policy_class(method)(12, sinks=2, **kwargs), 24)
    old, old_states = decode(embedded.model, ids, legacy(12, sinks=2, **kwargs), 24)
    assert torch.equal(new, old)
    for a, b in zip(new_states, old_states):
        for name in ("keys", "values", "positions", "acc", "count"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


# --- parts on hand-made states -------------------------------------------------------------------------------
def six_slots(keys: list[list[float]], positions: list[int], values=None) -> LayerState:
    """One (row, head) with the given 2-d keys and positions (-1: free), values = one-hot per slot unless given."""
    k = torch.tensor(keys, dtype=torch.float32)[None, None]  # (1, 1, 6, 2)
    v = torch.eye(len(keys))[None, None] if values is None else torch.tensor(values, dtype=torch.float32)[None, None]
    state = LayerState.empty(k, v, capacity=len(keys), stats=("acc", "count", "depth"))
    state.keys.copy_(k)
    state.values.copy_(v)
    state.positions.copy_(torch.tensor(positions)[None, None])
    state.step.fill_(max(positions) + 1)
    return state


def test_similarity_target_picks_most_similar_valid_slot_not_free_slots_or_sinks():
    # victim slot 2 has key (1, 0). Slot 0 (a sink, position 0) is identical, slot 4 is free but identical,
    # slot 5 is the most similar survivor (cos 0.8), slot 1 less (cos 0), slot 3 opposite.
    state = six_slots([[1, 0], [0, 1], [1, 0], [-1, 0], [1, 0], [4, 3]], [0, 3, 5, 7, -1, 9])
    target, ok, best = MostSimilar(sinks=2).find(state, torch.tensor([[2]]), None)
    assert target.item() == 5 and ok.item() and best.item() == pytest.approx(0.8)
    # a threshold above the best cosine: no merge
    assert not MostSimilar(sinks=2, threshold=0.9).find(state, torch.tensor([[2]]), None)[1].item()
    # with sinks=0 the identical position-0 slot wins
    assert MostSimilar(sinks=0).find(state, torch.tensor([[2]]), None)[0].item() == 0


def test_depth_cap_is_respected_over_a_hand_made_sequence():
    # merge:target=right,weights=equal,cap=1: no value may carry more than one merged token.
    policy = make_policy("merge:target=right,weights=equal,cap=1", 5, sinks=0, recent=1)
    state = six_slots([[1, 0]] * 6, [0, 1, 2, 3, 4, 5])
    yes = torch.tensor([[True]])
    policy.merge(state, torch.tensor([[2]]), yes)  # position 2 -> 3: slot 3 now carries one merged token
    state.remove(torch.tensor([[2]]))
    assert state.depth[0, 0].tolist() == [0, 0, 0, 1, 0, 0]
    assert state.values[0, 0, 3].tolist() == [0, 0, 0.5, 0.5, 0, 0]
    policy.merge(state, torch.tensor([[1]]), yes)  # position 1: its right neighbour (slot 3) is capped: skip to 4
    state.remove(torch.tensor([[1]]))
    assert state.depth[0, 0].tolist() == [0, 0, 0, 1, 1, 0]
    assert state.values[0, 0, 4].tolist() == [0, 0.5, 0, 0, 0.5, 0]
    assert state.values[0, 0, 3].tolist() == [0, 0, 0.5, 0.5, 0, 0]
    before = state.values.clone()
    policy.merge(state, torch.tensor([[3]]), yes)  # a victim carrying 1 = cap: evicted, nothing changes
    assert torch.equal(state.values, before) and state.depth[0, 0].tolist() == [0, 0, 0, 1, 1, 0]
    uncapped = make_policy("merge:target=right,weights=equal", 5, sinks=0, recent=1)
    uncapped.merge(state, torch.tensor([[3]]), yes)  # without the cap the same merge cascades into slot 4
    assert state.values[0, 0, 4].tolist() == [0, 0.25, 0.25, 0.25, 0.25, 0]


def test_merging_press_weight_on_a_hand_worked_example():
    # k_j = (1, 0), k_t = (3, 4): cos 0.6. |v_j| = 3, |v_t| = 1: w = 0.6 * 3 / 4 = 0.45; v_t <- 0.45 v_j + 0.55 v_t
    state = six_slots([[1, 0], [3, 4], [0, 1], [0, 1], [0, 1], [0, 1]], [0, 1, 2, 3, 4, 5],
                      values=[[3, 0], [0, 1], [0, 0], [0, 0], [0, 0], [0, 0]])
    victims, targets = torch.tensor([[[0]]]), torch.tensor([[[[1]]]])
    cos = torch.tensor([[[[0.6]]]])
    w_j, w_t = NormRatioWeights().pair(None, state, victims, targets, torch.ones_like(targets, dtype=bool), cos)
    assert w_j.item() == pytest.approx(0.45) and w_t.item() == pytest.approx(0.55)
    policy = make_policy("mergingpress_like", 5, sinks=0, recent=1)
    policy.merge(state, torch.tensor([[0]]), torch.tensor([[True]]))
    assert state.values[0, 0, 1].tolist() == pytest.approx([1.35, 0.55])


@pytest.mark.parametrize("what, key_changes", [("value", False), ("key_value", True), ("key", True)])
def test_key_merge_changes_the_key_value_only_never_does(what, key_changes):
    state = six_slots([[1, 0], [0, 2], [1, 1], [2, 0], [0, 1], [1, 3]], [0, 1, 2, 3, 4, 5])
    keys, values = state.keys.clone(), state.values.clone()
    make_policy(f"merge:target=right,weights=equal,what={what}", 5, sinks=0, recent=1).merge(
        state, torch.tensor([[1]]), torch.tensor([[True]]))
    assert (not torch.equal(state.keys, keys)) == key_changes
    assert torch.equal(state.keys[0, 0, 2], torch.tensor([0.5, 1.5]) if key_changes else keys[0, 0, 2])
    assert (not torch.equal(state.values, values)) == (what != "key")


def test_similarity_weights_are_d2o_softmax_against_self():
    state = six_slots([[1, 0], [0, 1], [1, 0], [-1, 0], [1, 0], [4, 3]], [0, 1, 2, 3, 4, 5],
                      values=[[0, 0]] * 5 + [[1, 1]])
    make_policy("merge:target=similar,weights=similarity", 5, sinks=0, recent=0).merge(
        state, torch.tensor([[1]]), torch.tensor([[True]]))  # k_1 = (0, 1): most similar is slot 5, cos 0.6
    w = math.exp(0.6) / (math.exp(0.6) + math.e)
    assert state.values[0, 0, 5].tolist() == pytest.approx([1 - w, 1 - w])


# --- names, presets and bad input ------------------------------------------------------------------------------
def test_presets_and_custom_points_are_method_names():
    for name in PRESETS:
        policy = make_policy(name, 32)
        assert policy.name == name
    point = make_policy("merge:target=similar,weights=attention,what=value,cap=2", 32)
    assert point.name == "merge:target=similar,weights=attention,what=value,cap=2"
    assert point.spec == MergeSpec(target="similar", cap=2) and "depth" in point.stats
    assert make_policy("weightedkv_similar", 32).spec == MergeSpec(target="similar")
    tova, h2o = make_policy("tova_orig", 32, sinks=4), make_policy("h2o_orig", 32, sinks=4)
    assert (tova.sinks, tova.recent, h2o.sinks, h2o.recent) == (0, 0, 0, 16)


@pytest.mark.parametrize("name, message", [
    ("merge:target=left", "unknown target 'left'"),
    ("merge:weights=votes2", "unknown weights 'votes2'"),
    ("keepkv_liked", "unknown compression method 'keepkv_liked'"),
    ("merge:target=right,threshold=0.5", "threshold is a similarity guard: it needs target=similar, not target=right"),
    ("merge:target=next,weights=attention", "weights=attention with target=next"),
    ("merge:cap=0", "cap must be at least 1"),
    ("merge:color=red", "unknown key 'color'"),
    ("merge:cap=two", "cap must be a number"),
])
def test_bad_specs_fail_with_one_line(name, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")) as error:
        make_policy(name, 32)
    assert "\n" not in str(error.value)


def test_a_point_keeps_its_commas_in_a_method_list():
    assert parse_names("weightedkv, merge:target=similar,weights=attention,cap=2,cam") == [
        "weightedkv", "merge:target=similar,weights=attention,cap=2", "cam"]


@pytest.mark.parametrize("name", [*PRESETS, "merge:target=similar,what=key_value,cap=2,threshold=0.1"])
def test_every_preset_keeps_budget_and_window_over_prompt_and_steps(name):
    policy = make_policy(name, 10, sinks=2, recent=3)
    blocks = chunks(7, [14] + [1] * 12)  # a long prompt (ranked pass) then single steps
    state = None
    for step, (k, v, pos) in enumerate(blocks):
        state = state or LayerState.empty(k, v, stats=policy.stats)
        state.append(k, v, pos)
        state.observe(to_slots(state, causal_attn(step, k.shape[2], int(state.n_valid()[0, 0]))))
        policy.compress(state)
        assert int(state.n_valid().max()) <= 10
    newest = state.step.item() - 1
    assert bool((state.positions == newest).any(-1).all())  # the newest token is never a victim
    spec = getattr(policy, "spec", None)
    if spec is not None and spec.cap is not None:
        assert float(state.depth.max()) <= spec.cap  # no value carries more than cap merged tokens


@pytest.mark.slow
def test_perturbation_page_shows_a_merge_study(tmp_path, monkeypatch, tiny_model):
    """A merges.json (this one: the command on 1 document x 24 tokens, m=8) opens as the space and cascade figures."""

    root = tmp_path / "runs"
    (root / "merges").mkdir(parents=True)
    monkeypatch.setenv("KVLENS_RUNS", str(root))
    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path / "starter"))
    loaded = LoadedModel(tiny_model("llama"), None, "tiny-llama", torch.device("cpu"), torch.float32)
    seqs = [("s0", torch.randint(0, 100, (40,), generator=torch.Generator().manual_seed(0)).tolist())]
    save_study(root / "fig2", *run_study(loaded, seqs, Settings("fig2", 40, t0=20, future=20, sinks=2)), png=False)
    shutil.copy(Path(__file__).parent / "merges_small.json", root / "merges" / "merges.json")
    assert fig_space(json.loads((root / "merges" / "merges.json").read_text())).data[0].text[1][0] == "1/1"
    at = app("pages/4_Perturbation.py").run()  # cam beat streaming_llm on the one books document: 1/1
    merge_titles = [t for t in titles(at) if t.startswith(("Merge space", "Cascade"))]
    assert len(merge_titles) == 2 and not at.exception and at.selectbox(key="merge_study").value == "merges"
