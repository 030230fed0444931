"""Head profiles, per-head plans and their evaluation: totals and floors, agreement with the spectra and
sweep modules, the profiling/evaluation split, and the commands' bad inputs."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from analysis.app import starter
from analysis.errors import UserError
from analysis.heads.allocate import BASELINES, baseline, greedy_plan, layer_plan, parse_total, random_plan, uniform_plan
from analysis.heads.evaluate import check_split, evaluate_plans, profiled_ids
from analysis.heads.profile import (
    attention_stats,
    error_column,
    grid,
    head_errors,
    profile_capture,
    profile_summary,
    summary_lines,
)
from analysis.jobs.job import Job
from analysis.jobs.plan import Plan
from analysis.models.loading import LoadedModel
from analysis.perplexity.sweep import run_sweep
from analysis.perplexity.windows import make_windows
from analysis.runtime.capture import record
from analysis.spectra.compute import compute_spectra
from analysis.text.corpora import load_documents
from tests.conftest import REPO


def fake_profile(L=6, H=3, budgets=(16, 32, 64, 128), tokens=256, seed=0) -> dict:
    """A profile with random decreasing error curves, enough for the planner."""
    rng = random.Random(seed)
    rows = []
    for l in range(L):
        for h in range(H):
            row = {"layer": l, "kv_head": h, "rank": 0, "sensitivity": 0.0}
            for m in ("weightedkv", "weightedkv_evict"):
                e = rng.uniform(0.2, 1.0)
                for b in budgets:
                    row[error_column(m, b)] = e
                    e *= rng.uniform(0.3, 0.9)
            rows.append(row)
    return {"model": "fake", "num_layers": L, "layers": list(range(L)), "num_kv_heads": H, "tokens": tokens,
            "budgets": list(budgets), "methods": ["weightedkv", "weightedkv_evict"], "sinks": 4, "text_ids": ["a"],
            "columns": list(rows[0]), "rows": rows}


@pytest.mark.parametrize("total", [18 * 5, 18 * 5 + 7, 18 * 16, 18 * 40 + 11, 18 * 255])
def test_plans_never_exceed_the_total_and_give_every_head_its_floor(total):
    profile = fake_profile()
    plans = [greedy_plan(profile, total), uniform_plan(6, 3, total), layer_plan(6, 3, total, cap=255),
             random_plan(6, 3, total, cap=255, seed=3)]
    for plan in plans:
        assert plan.total_slots <= total, plan.name
        assert plan.min_budget >= plan.floor() == 5, plan.name
        assert plan.max_budget <= 255, plan.name
    assert plans[0].total_slots == total  # the greedy plan spends everything it may
    assert plans[0].merge is not None and len(plans[0].merge) == 6
    layer = plans[2].budgets
    assert all(max(row) - min(row) <= 1 for row in layer) and layer[0][0] >= layer[-1][0]  # pyramid, per layer
    assert [p.total_slots for p in plans] == [total] * 4  # every one at exactly the requested memory


@pytest.mark.parametrize("total", [731, 18 * 40 + 17, 18 * 40])
def test_every_baseline_is_at_exactly_the_plans_memory(total):
    """731 slots over 18 heads: uniform used to give 18 x 40 = 720. The remainder is spread one slot per head."""
    plan = greedy_plan(fake_profile(), total)
    assert plan.total_slots == total
    for name in BASELINES:
        other = baseline(name, plan, cap=255)
        assert other.total_slots == total, name
    uniform = baseline("uniform", plan).budgets
    flat = [b for row in uniform for b in row]
    assert set(flat) <= {total // 18, total // 18 + 1} and flat.count(total // 18 + 1) == total % 18
    extras = [row.count(total // 18 + 1) for row in uniform] if total % 18 else [0]
    assert max(extras) - min(extras) <= 1  # spread over the layers, not piled on the first ones


def test_greedy_follows_the_error_curves():
    profile = fake_profile(L=2, H=1, budgets=(16, 64), tokens=128)
    merge, evict = profile["rows"]  # layer 0 loses much and merging helps it; layer 1 loses little, evicting helps
    merge |= {error_column("weightedkv", 16): 0.9, error_column("weightedkv", 64): 0.45,
              error_column("weightedkv_evict", 16): 1.0, error_column("weightedkv_evict", 64): 0.9}
    evict |= {error_column("weightedkv", 16): 0.02, error_column("weightedkv", 64): 0.02,
              error_column("weightedkv_evict", 16): 0.01, error_column("weightedkv_evict", 64): 0.005}
    plan = greedy_plan(profile, 100)
    assert plan.budgets[0][0] > plan.budgets[1][0] >= 16 and plan.total_slots == 100
    assert plan.merge == [[True], [False]]


def test_total_below_the_floor_names_the_minimum():
    with pytest.raises(UserError, match="minimum 90 slots"):
        greedy_plan(fake_profile(), 89)
    assert parse_total("128x", 90) == 11520 and parse_total("1000", 90) == 1000
    with pytest.raises(UserError, match="--total-budget"):
        parse_total("lots", 90)


def test_uniform_baseline_of_a_plan_keeps_its_shape_and_total():
    plan = greedy_plan(fake_profile(), 18 * 40)
    same = baseline("uniform", plan)
    assert (same.num_layers, same.num_kv_heads, same.total_slots) == (6, 3, 18 * 40) and same.merge is None
    with pytest.raises(UserError, match="unknown baseline"):
        baseline("pyramid", plan)


def test_controls_keep_one_choice_of_the_plan_and_fix_the_other():
    plan = greedy_plan(fake_profile(), 18 * 40)
    assert 0 < sum(map(sum, plan.merge)) < 18  # the fake profile makes some heads merge, not all
    for name, merge in (("budgets-merge", True), ("budgets-evict", False)):
        control = baseline(name, plan)
        assert control.budgets == plan.budgets and control.merge == [[merge] * 3] * 6 and control.name == name
    evict = baseline("uniform-evict", plan)
    assert evict.budgets == baseline("uniform", plan).budgets and evict.merge == [[False] * 3] * 6


def tiny_capture(tiny_model, random_ids, T=48, B=2):

    model = tiny_model("llama")
    with record(model) as rec, torch.inference_mode():
        model(random_ids(B, T, seed=5))
    capture = rec.result()
    capture.meta |= {"text_ids": ["x", "y"], "config": {"num_layers": 4}}
    return capture


def test_profile_agrees_with_spectra_and_the_sweep(tiny_model, random_ids):

    capture = tiny_capture(tiny_model, random_ids)
    profile = profile_capture(capture, budgets=(8, 16), sinks=2, recent_window=8)
    assert len(profile["rows"]) == 4 * 2 and sorted(r["rank"] for r in profile["rows"]) == list(range(1, 9))
    spectra = compute_spectra(capture, kinds=("key_pre_rope", "key_post_rope", "value"))
    errors = head_errors(capture, ["weightedkv", "weightedkv_evict"], [8, 16], sinks=2)
    for kind, column in (("key_pre_rope", "key_pre_rope_rank90"), ("key_post_rope", "key_post_rope_rank90"),
                         ("value", "value_rank90")):
        assert grid(profile, column) == spectra.matrix(kind, "rank_90_mean")
    for (m, b), e in errors.items():
        assert torch.allclose(torch.tensor(grid(profile, error_column(m, b))), e, atol=1e-7)
        assert (e > 0).all()  # 48 tokens through 8 or 16 slots: every head's output moves
    for r in profile["rows"]:
        mme = sum(r[error_column("weightedkv", b)] - r[error_column("weightedkv_evict", b)] for b in (8, 16)) / 2
        assert r["merge_minus_evict"] == pytest.approx(mme, abs=1e-6)
        best = [min(r[error_column("weightedkv", b)], r[error_column("weightedkv_evict", b)]) for b in (8, 16)]
        assert r["sensitivity"] == pytest.approx(sum(best) / 2, abs=1e-6)  # trapezoid over one octave
        assert r["sink_share"] + r["recent_share"] + r["middle_share"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UserError, match="unknown measure"):
        grid(profile, "loudness")
    with pytest.raises(UserError, match="unknown compression method"):
        profile_capture(capture, methods=("weightedkv", "weightedkv_evict", "zip"), budgets=(8,))


def test_attention_statistics_by_hand():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 12, 4, generator=gen), torch.randn(1, 1, 12, 4, generator=gen)
    stats = attention_stats(q, k, sinks=2, recent_window=3, from_query=6)
    want = {"sink_share": 0.0, "recent_share": 0.0, "distance": 0.0, "entropy": 0.0}
    for head in range(2):
        for t in range(6, 12):
            p = ((q[0, head, t] @ k[0, 0, : t + 1].T) / 2).softmax(-1)
            want["sink_share"] += p[:2].sum().item()
            want["recent_share"] += p[t - 2 : t + 1].sum().item()
            want["distance"] += sum(p[j].item() * (t - j) for j in range(t + 1))
            want["entropy"] -= sum(p[j].item() * math.log(p[j].item()) for j in range(t + 1))
    for key, total in want.items():
        assert stats[key][0].item() == pytest.approx(total / 12, rel=1e-4), key


def test_a_plan_without_a_profile_block_is_refused_unless_overridden():
    assert profiled_ids({"profile": {"text_ids": ["books/a"]}}, "p.json") == (["books/a"], True)
    for data in ({}, {"profile": None}, {"profile": {"dir": "x"}}, {"profile": {"text_ids": "books/a"}}):
        with pytest.raises(UserError, match="p.json has no 'profile' block.*--no-profile-check"):
            profiled_ids(data, "p.json")
        assert profiled_ids(data, "p.json", allow_missing=True) == ([], False)
    # a block is checked even with the override: the override only admits a plan that has none
    assert profiled_ids({"profile": {"text_ids": ["books/a"]}}, "p.json", allow_missing=True) == (["books/a"], True)


def test_overlapping_documents_are_refused():
    check_split(["books/a", "books/b#1"], ["books/c", "web/a"])
    with pytest.raises(UserError, match="overlaps the profiling text"):
        check_split(["books/a"], ["books/c", "books/a#2"])  # a later chunk of a profiled document
    with pytest.raises(UserError, match="overlaps"):
        check_split(["books/b#1"], ["books/b"])


def test_uniform_plan_reproduces_the_uniform_evaluation_exactly(tiny_model, random_ids):


    model = tiny_model("llama")
    ids = random_ids(2, 40, seed=9)
    windows = make_windows([("d0", ids[0].tolist()), ("d1", ids[1].tolist())], 24)
    loaded = LoadedModel(model=model, tokenizer=None, model_id="tiny", device=torch.device("cpu"), dtype=torch.float32)
    source = {"corpus": "tiny"}
    summary, _ = run_sweep(loaded, windows, [Job.of("weightedkv", 12)], source=source, tokens=40, documents=2)
    plain = summary["results"][0]
    rows = evaluate_plans(loaded, windows, [Plan.uniform(4, 2, 12, name="uniform")], source, 40, 2)
    assert rows[0]["ppl"] == plain["ppl"] and rows[0]["per_document_ppl"] == plain["per_document_ppl"]
    assert rows[0]["total_slots"] == 4 * 2 * 12 and rows[0]["plan"] == "uniform"
    other = evaluate_plans(loaded, windows, [Plan.uniform(4, 2, 8)], source, 40, 2)
    assert other[0]["ppl"] != plain["ppl"]  # the comparison can tell budgets apart


def heads_command(*args):
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.heads", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)


def assert_refused(done, message, out: Path):
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.slow
def test_commands_refuse_bad_input_without_writing(tmp_path):
    profile_dir = tmp_path / "profile"
    profile_dir.mkdir()
    (profile_dir / "profile.json").write_text(json.dumps(fake_profile(L=30, H=3)))
    out = tmp_path / "out"
    assert_refused(heads_command("plan", "--profile", str(profile_dir), "--total-budget", "100", "--out", str(out)),
                   "minimum 450 slots", out)
    assert_refused(heads_command("profile", "--methods", "weightedkv,zip", "--out", str(out)),
                   "unknown compression method 'zip'", out)
    done = heads_command("plan", "--profile", str(profile_dir), "--total-budget", "16x", "--out", str(out), "--no-png")
    assert done.returncode == 0, done.stderr
    written = json.loads((out / "plan.json").read_text())
    assert written["total_slots"] == 16 * 90 and written["profile"]["text_ids"] == ["a"]
    evaluation = tmp_path / "evaluation"
    common = ["--tokens", "96", "--window", "64", "--documents", "1", "--quiet", "--no-png", "--out", str(evaluation)]
    plan_file = json.loads((out / "plan.json").read_text())

    plan_file["profile"]["text_ids"] = [load_documents(corpus="books")[0].id]  # as if it profiled the first book
    (tmp_path / "seen.json").write_text(json.dumps(plan_file))
    done = heads_command("evaluate", "--plan", str(tmp_path / "seen.json"), "--corpus", "books", *common)
    assert_refused(done, "evaluation text overlaps the profiling text", evaluation)
    small = Plan([[16] * 3] * 3, name="short").save(tmp_path / "short.json")  # no profile block
    assert_refused(heads_command("evaluate", "--plan", str(small), "--corpus", "web", *common),
                   "has no 'profile' block", evaluation)
    assert_refused(heads_command("evaluate", "--plan", str(small), "--corpus", "web", "--no-profile-check", *common),
                   "3 layers x 3 KV heads, but the model has 30 x 3", evaluation)
    other = Plan([[16]] * 18, name="gemma-shaped", model="gemma3-270m")  # a plan made for the other model
    other = json.loads(other.save(tmp_path / "other.json").read_text()) | {"profile": plan_file["profile"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert_refused(heads_command("evaluate", "--plan", str(tmp_path / "other.json"), "--corpus", "web", *common),
                   "made for model 'gemma3-270m'", evaluation)
    assert_refused(heads_command("evaluate", "--plan", str(out / "plan.json"), "--baselines", "uniform,zig", *common),
                   "unknown baseline 'zig'", evaluation)


def test_heads_page(tmp_path, monkeypatch):


    monkeypatch.setenv("KVLENS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path / "starter"))
    page = str(REPO / "pages" / "6_Heads.py")
    profile = fake_profile()
    for n, r in enumerate(profile["rows"]):
        r |= {"rank": n + 1, "key_post_rope_rank90": 10.0 + n, "merge_minus_evict": 0.01 * (n - 9)}
    profile["columns"] = list(profile["rows"][0])
    profile |= {"sequences": 1}
    starter.profile_dir().mkdir(parents=True)  # as if set-up had made the starter profile
    (starter.profile_dir() / "profile.json").write_text(json.dumps(profile | {"model": "starter"}))
    at = AppTest.from_file(page, default_timeout=120).run()
    assert not at.exception and not at.error and "No head profiles" in at.info[0].value
    assert at.selectbox(key="profile").value == starter.PROFILE_LABEL and "starter" in at.caption[0].value
    (tmp_path / "runs" / "prof").mkdir(parents=True)
    (tmp_path / "runs" / "prof" / "profile.json").write_text(json.dumps(profile))
    at = AppTest.from_file(page, default_timeout=120).run()
    assert not at.exception and not at.error and not at.info
    assert at.selectbox(key="profile").options == ["prof", starter.PROFILE_LABEL]
    assert len(at.dataframe[0].value) == 18 and list(at.dataframe[0].value["rank"])[:3] == [1, 2, 3]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert titles[0].startswith("sensitivity vs key_post_rope_rank90") and titles[1] == "sensitivity per head"
    assert titles[2].startswith("plan greedy-2304: 2304 slots")
    at.selectbox(key="start").set_value("uniform").run()
    at.selectbox(key="heatmap_measure").set_value("merge_minus_evict").run()
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert not at.exception and titles[1] == "merge_minus_evict per head" and titles[2] == "plan uniform: 2304 slots"


@pytest.mark.slow
def test_heads_page_evaluates_a_plan_and_its_baselines_on_the_embedded_model(tmp_path, monkeypatch):
    """First open computes the starter profile; Evaluate runs the plan and the chosen baselines."""

    monkeypatch.setenv("KVLENS_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path / "starter"))

    at = AppTest.from_file(str(REPO / "pages" / "6_Heads.py"), default_timeout=600).run()
    assert not at.exception and not at.error and at.selectbox(key="profile").value == starter.PROFILE_LABEL
    assert "256 tokens of books/austen/emma" in at.caption[0].value  # computed on this first open
    at.number_input(key="mean_budget").set_value(16).run()
    at.multiselect(key="eval_baselines").set_value(["uniform", "budgets-evict"])
    at.selectbox(key="eval_corpus").set_value("web")
    for name, value in (("eval_tokens", 256), ("eval_window", 256), ("eval_documents", 1)):
        at.number_input(key=name).set_value(value)
    at.button[-1].click().run()
    assert not at.exception and not at.error
    table = at.dataframe[-1].value
    assert list(table["plan"]) == ["uniform", "budgets-evict", "greedy-1440"] and set(table["slots"]) <= {1440}
    assert (table["ppl"] > 1).all()


def test_profile_summary_by_hand():

    cols = ["layer", "kv_head", "rank", "sensitivity", "merge_minus_evict", "entropy",
            "error_weightedkv_8", "error_weightedkv_evict_8"]
    rows = [dict(zip(cols, v)) for v in ([0, 0, 1, 0.3, -0.1, 3.0, 0.2, 0.3],
                                         [0, 1, 2, 0.2, 0.1, 2.0, 0.4, 0.3],
                                         [1, 0, 3, 0.1, 0.05, 1.0, 0.5, 0.45])]
    summary = profile_summary({"budgets": [8], "columns": cols, "rows": rows})
    assert summary["per_budget"]["8"] == {"mean_error_merge": pytest.approx(1.1 / 3),
                                          "mean_error_evict": pytest.approx(1.05 / 3), "heads_merge_lower": 1}
    assert summary["heads_merge_better"] == 1 and summary["merge_minus_evict_min"] == -0.1
    assert summary["correlation_with_sensitivity"]["entropy"] == pytest.approx(1.0)  # linear in sensitivity
    assert "merge lower in 1 of 3 heads" in summary_lines(summary)[0]
