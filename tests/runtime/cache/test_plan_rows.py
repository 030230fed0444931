"""Several per-head plans packed as batch rows: each row is held to its own plan, as if it ran alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from analysis.errors import UserError
from analysis.heads.evaluate import evaluate_plans
from analysis.jobs.plan import Plan
from analysis.models.loading import LoadedModel
from analysis.perplexity.windows import make_windows
from analysis.runtime.cache import CompressedCache, Rows

PLANS = [Plan([[8, 14], [12, 12], [14, 9], [9, 10]], sinks=2, merge=[[True, False], [False, True]] * 2, name="a"),
         Plan.uniform(4, 2, 11, sinks=2, name="uniform"),
         Plan([[10, 10], [9, 9], [13, 13], [12, 12]], sinks=2, name="layer")]


def feed(model, cache, ids):
    with torch.no_grad():
        for t in range(ids.shape[1]):  # token by token, so every step compresses
            model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((ids.shape[0], 1), t),
                  use_cache=True)


def test_each_row_keeps_what_its_plan_keeps_alone(tiny_model, random_ids):
    model = tiny_model("llama")
    ids = random_ids(1, 30, seed=11).expand(len(PLANS), -1)
    with CompressedCache(model, "weightedkv", rows=Rows(plans=PLANS)) as packed:
        feed(model, packed, ids)
    for row, plan in enumerate(PLANS):
        with CompressedCache(model, "weightedkv", plan=plan) as alone:
            feed(model, alone, ids[:1])
        for layer in range(4):
            assert packed.layers[layer].state.n_valid()[row].tolist() == plan.budgets[layer]
            mine, theirs = packed.layers[layer].state, alone.layers[layer].state
            for h in range(2):  # the packed buffers are wider (the widest row's budget + 1): compare held slots
                held, held_alone = mine.positions[row, h] >= 0, theirs.positions[0, h] >= 0
                assert torch.equal(mine.positions[row, h][held], theirs.positions[0, h][held_alone]), (plan.name, layer)
                torch.testing.assert_close(mine.values[row, h][held], theirs.values[0, h][held_alone])


def test_packed_plan_evaluation_equals_one_plan_at_a_time(tiny_model, random_ids):
    model = tiny_model("llama")
    ids = random_ids(2, 40, seed=12)
    windows = make_windows([("d0", ids[0].tolist()), ("d1", ids[1].tolist())], 24)
    loaded = LoadedModel(model=model, tokenizer=None, model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    source = {"corpus": "tiny"}
    together = evaluate_plans(loaded, windows, PLANS, source, 40, 2)
    for row, plan in zip(together, PLANS):
        alone = evaluate_plans(loaded, windows, [plan], source, 40, 2)[0]
        assert row["plan"] == plan.name and row["total_slots"] == plan.total_slots
        assert row["ppl"] == pytest.approx(alone["ppl"], rel=1e-5)
        assert row["per_document_ppl"] == pytest.approx(alone["per_document_ppl"], rel=1e-5)
    assert len({r["ppl"] for r in together}) == len(PLANS)  # the rows really differ


def test_plans_to_pack_must_be_told_apart():
    with pytest.raises(UserError, match="'uniform' given twice"):
        evaluate_plans(None, None, [PLANS[1], PLANS[1]], {}, 40, 2)
    model = SimpleNamespace(config=SimpleNamespace(num_hidden_layers=4, num_key_value_heads=2))
    other = Plan.uniform(4, 2, 11, sinks=3)
    with pytest.raises(UserError, match="share sinks and recent"):
        CompressedCache(model, "weightedkv", rows=Rows(plans=[PLANS[1], other]))
