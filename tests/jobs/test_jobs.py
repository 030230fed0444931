"""analysis.jobs: a configured run re-budgeted with its options, and a plan checked once per model shape."""

from __future__ import annotations

import pytest

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.jobs import Job, Plan


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def test_a_plan_is_checked_once_per_model_shape_and_again_for_another(llama):
    plan = Plan([[16, 16]] * 4)
    plan.check(llama.config)
    assert plan._checked is not None and "_checked" not in plan.to_json()
    other = type(llama.config)(**(llama.config.to_dict() | {"num_hidden_layers": 3}))
    with pytest.raises(UserError, match="4 layers x 2 KV heads, but the model has 3 x 2"):
        plan.check(other)  # a passed check never hides a failing one
    plan.budgets.append([16, 16])  # now 5 layers: the shape it was checked with is gone
    with pytest.raises(UserError, match="5 layers x 2 KV heads, but the model has 4 x 2"):
        plan.check(llama.config)


def test_at_budget_keeps_the_options_and_splits_the_new_budget_as_asked():
    job = Job.of("weightedkv", 64, PolicyOptions(sinks=2, recent=None, seed=3))
    moved = job.at_budget(20)
    assert (moved.budget, moved.policy.sinks, moved.policy.recent, moved.options) == (20, 2, 8, job.options)
    assert job.at_budget(64) is job
    with pytest.raises(UserError, match="uniform job"):
        Job.of("weightedkv", None, plan=Plan([[16, 16]] * 4)).at_budget(20)
