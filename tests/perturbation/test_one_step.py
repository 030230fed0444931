"""analysis.perturbation.one_step: exact cases by hand, agreement with the cache, and the paper's claim."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.compress import LayerState, PolicyOptions
from analysis.errors import UserError
from analysis.jobs.job import Job
from analysis.models.loading import LoadedModel
from analysis.perturbation.end_to_end import end_to_end
from analysis.perturbation.ideal import VARIANTS, ideal_errors
from analysis.perturbation.one_step import PAIR, pair_jobs, perturb, perturb_state, state_at
from analysis.perturbation.study import Settings, check_result_dir, paired_lines, run_study
from analysis.report.save import save_study
from analysis.runtime.cache import CompressedCache
from analysis.runtime.capture import record
from experiments.common import run_main
from experiments.perturbation import main

NEG = -1.0e4  # a score whose softmax weight underflows to exactly 0 in float32


def hand_state(keys: torch.Tensor, values: torch.Tensor, avg: torch.Tensor) -> LayerState:
    """A (1, 1, t, D) state whose average attention a / n is ``avg`` (t,)."""
    t = keys.shape[0]
    state = LayerState.empty(keys[None, None], values[None, None])
    state.append(keys[None, None], values[None, None], torch.arange(t))
    state.count = torch.arange(t, 0, -1, dtype=torch.float32)[None, None]  # causal: slot i seen t - i times
    state.acc = avg[None, None] * state.count
    return state


def setup(t=8, victim=3, D=4, seed=0):
    """Keys whose score with the future query q = e0 is NEG except where stated; distinct values."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.zeros(t, D)
    keys[:, 0] = NEG  # score q . k / sqrt(D) = NEG / 2 with q = e0: weight exactly 0
    values = torch.randn(t, D, generator=gen)
    avg = torch.full((t,), 0.5)
    avg[victim] = 0.1
    q = torch.zeros(1, 2, 1, D)  # (B, Hq=2, F=1, D): two query heads share the single KV head
    q[..., 0] = 1.0
    future_k = torch.zeros(1, 1, 1, D)
    future_k[..., 0] = NEG  # the future token itself is not attended either
    return keys, values, avg, q, future_k, torch.randn(1, 1, 1, D, generator=gen)


def test_evicting_an_unattended_token_is_exact():
    keys, values, avg, q, fk, fv = setup()
    keys[[0, 4], 0] = 0.0  # the future query attends only to tokens 0 and 4; victim 3 gets exactly 0
    res = perturb_state(hand_state(keys, values, avg), q, fk, fv, pair_jobs(len(avg), sinks=1))
    assert res["weightedkv"]["victim"].item() == 3
    assert res["weightedkv_evict"]["rel_error"].max().item() <= 1e-6
    assert res["weightedkv_evict"]["attn_cosine_padded"].min().item() >= 1 - 1e-6
    assert res["weightedkv"]["rel_error"].min().item() > 1e-3  # merging v_3 into v_4 does disturb


def test_merge_is_ideal_for_identical_keys_in_the_attention_ratio():
    """k_3 = k_4 hold all the query's attention (ratio 1 : 1) and ā_3 = ā_4: ṽ reproduces o exactly."""
    keys, values, avg, q, fk, fv = setup()
    keys[[3, 4], 0] = 0.0  # identical keys, equal current attention 1/2 each
    avg[4] = avg[3]  # ā_3 : ā_4 = 1 : 1 = the current ratio; argmin takes the first, j = 3
    res = perturb_state(hand_state(keys, values, avg), q, fk, fv, pair_jobs(len(avg), sinks=1))
    assert res["weightedkv"]["victim"].item() == 3
    assert res["weightedkv"]["rel_error"].max().item() <= 1e-5
    assert res["weightedkv_evict"]["rel_error"].min().item() > 0.1
    assert res["weightedkv"]["attn_cosine"].min().item() >= 1 - 1e-6  # surviving keys are untouched


def test_state_at_equals_full_cache_and_capture(tiny_model, random_ids):

    model, ids, t = tiny_model("llama"), random_ids(2, 20, seed=3), 12
    with record(model) as rec, torch.inference_mode():
        model(ids)
    cap = rec.result()
    with record(model) as rec, torch.inference_mode():  # only the first t queries
        model(ids[:, :t])
    prefix = rec.result()
    cache = CompressedCache(model, "weightedkv", 16, sinks=2)  # budget > t: nothing compressed yet
    with torch.inference_mode(), cache:
        model(ids[:, :t], past_key_values=cache)
    for layer in (0, 3):
        ref = cache.layers[layer].state  # a fresh cache fills its slots in position order
        for row in range(2):
            s = state_at(cap, layer, t, row)
            for name in ("keys", "values") + ref.stats:
                assert torch.allclose(getattr(s, name)[0], getattr(ref, name)[row, :, :t], atol=1e-5), name
            assert torch.equal(s.positions[0], ref.positions[row, :, :t])
            assert torch.allclose(s.acc[0], prefix.get(layer, "attn_received_kv")[row], atol=1e-5)
        full = state_at(cap, layer, 20, 1)  # all captured queries: the capture's own statistics
        assert torch.allclose(full.acc[0], cap.get(layer, "attn_received_kv")[1], atol=1e-5)
    with pytest.raises(UserError):
        perturb(cap, 0, 15, future=6)
    out = perturb(cap, 1, 12, pair_jobs(12, methods=PAIR + ("h2o",)), future=4)
    assert out["weightedkv"]["victim"] == out["weightedkv_evict"]["victim"]
    assert len(out["h2o"]["rel_error"]["per_step"]) == 4


# --- the study modes (analysis.perturbation.summary, end_to_end, ideal_merge, perturbation_study) ------------------

def tiny_loaded(tiny_model):

    return LoadedModel(tiny_model("llama"), None, "tiny-llama", torch.device("cpu"), torch.float32)


def tiny_capture(tiny_model, random_ids, T=40, seed=0):
    model = tiny_model("llama")
    with record(model, kinds=("query_post_rope", "key_post_rope", "value")) as rec, torch.inference_mode():
        model(random_ids(1, T, seed=seed))
    return rec.result()


def test_ideal_merge_is_exact_at_its_own_query_and_the_convex_ones_are_not(tiny_model, random_ids):

    for seed in range(3):
        errors = ideal_errors(tiny_capture(tiny_model, random_ids, seed=seed), 1, 20, 8, sinks=2)
        assert set(errors) == set(VARIANTS) and errors["ideal"].shape == (4, 9)
        assert errors["ideal"][:, 0].max() < 1e-5  # zero error at the merging query (every query head)
        assert errors["ideal"][:, 1:].max() > 1e-4  # query-dependent: not exact for the next queries
        for other in ("convex_query", "weightedkv", "evict"):
            assert errors[other][:, 0].min() > 1e-4, other


def test_end_to_end_kl_is_zero_without_compression(tiny_model, random_ids):

    jobs = [Job.of(m, b, PolicyOptions(sinks=2)) for m, b in [("full", None), ("weightedkv", 12), ("weightedkv", 99),
                                                               ("h2o", 12)]]
    res = end_to_end(tiny_model("llama"), random_ids(1, 40, seed=1)[0], jobs)
    assert res["kl"].shape == (4, 39) and res["delta_nll"].shape == (4, 39) and res["deviation"].shape == (4, 4, 39)
    for j in (0, 2):  # full, and a budget above the sequence: nothing is ever compressed
        assert res["kl"][j].abs().max() < 1e-6 and res["delta_nll"][j].abs().max() < 1e-5
        assert res["deviation"][j].max() < 1e-5
    for j in (1, 3):
        assert torch.equal(res["kl"][j, :12], torch.zeros(12))  # before the cache first fills
        assert res["kl"][j, 13:].mean() > 1e-6 and res["deviation"][j, :, 13:].mean() > 1e-4


def test_study_json_schema_and_exact_zeros(tiny_model, random_ids, tmp_path):


    loaded = tiny_loaded(tiny_model)
    seqs = [(f"s{i}", random_ids(1, 40, seed=i)[0].tolist()) for i in range(2)]
    cases = {"fig2": Settings("fig2", 40, t0=20, future=20, sinks=2),
             "sweep": Settings("sweep", 40, methods=["full", "weightedkv", "weightedkv_evict"], budgets=[12, 40],
                               sinks=2),
             "end2end": Settings("end2end", 40, methods=["full", "weightedkv"], budgets=[12], sinks=2),
             "ideal": Settings("ideal", 40, steps=[15, 25], future=8, sinks=2, layers=[0, 3])}
    for mode, settings in cases.items():
        settings.validate()
        summary, tensors = run_study(loaded, seqs, settings, source={"corpus": "random"})
        out = save_study(tmp_path / mode, summary, tensors, png=False)
        data = json.loads((out / "perturbation.json").read_text())
        assert {"mode", "model", "source", "sequences", "tokens", "methods", "budgets", "results"} <= set(data)
        assert data["mode"] == mode and data["sequences"] == 2 and data["model"] == "tiny-llama"
        for row in data["results"]:
            assert {"method", "budget", "layer", "kv_head", "mean", "std", "metric"} <= set(row), row
        assert (out / "perturbation.csv").read_text().startswith("mode,metric,method,budget,layer,kv_head,mean,std")
        assert list((out / "figures").glob("*.html"))
        if mode == "sweep":
            for row in data["results"]:
                if row["method"] == "full" or row["budget"] == 40:  # budget >= T: nothing compressed
                    assert row["mean"] == 0.0 and row["std"] == 0.0, row
            # jobs (full + 2 methods x 2 budgets) x layers x heads
            assert len([r for r in data["results"] if r["layer"] is not None]) == 5 * 4 * 2
            lines = paired_lines(data)  # budget 40 >= T: both exact 0, so merge is never strictly below
            assert len(lines) == 2
            assert lines[1] == "rel_error m=40: weightedkv below weightedkv_evict in 0 of 2 sequences (paired)"
        if mode == "end2end":
            kl = {r["method"]: r for r in data["results"] if r["metric"] == "kl"}
            assert kl["full"]["layer"] is None and kl["full"]["mean"] < 1e-6 and kl["weightedkv"]["mean"] > 0
            each = kl["weightedkv"]["per_sequence"]  # paired comparisons read these
            assert len(each) == 2 and sum(each) / 2 == pytest.approx(kl["weightedkv"]["mean"])
        if mode == "ideal":
            overall = {(r["metric"], r["method"]): r["mean"] for r in data["results"] if r["layer"] is None}
            assert overall["at_merge", "ideal"] < 1e-5 < overall["at_merge", "convex_query"]
    check_result_dir(tmp_path / "fig2", "tiny-llama")
    with pytest.raises(UserError, match="tiny-llama.*other-model"):
        check_result_dir(tmp_path / "fig2", "other-model")


@pytest.mark.parametrize("settings, message", [
    (dict(mode="bogus", tokens=40), "unknown mode"),
    (dict(mode="sweep", tokens=40, methods=["nope"], budgets=[12]), "unknown compression method"),
    (dict(mode="sweep", tokens=40, budgets=[8], sinks=4, recent=4), "leaves no room"),
    (dict(mode="end2end", tokens=40, budgets=[]), "at least one --budget"),
    (dict(mode="ideal", tokens=40, steps=[35], future=8), "--steps must lie in"),
])
def test_bad_settings_are_one_line_errors(settings, message):

    with pytest.raises(UserError, match=message) as err:
        Settings(**settings).validate()
    assert "\n" not in str(err.value)


def test_layers_and_heads_out_of_range():

    config = {"num_layers": 30, "num_kv_heads": 3}
    with pytest.raises(UserError, match="0..29"):
        Settings("fig2", 900, layers=[30]).check_model(config)
    with pytest.raises(UserError, match="0..2"):
        Settings("fig2", 900, heads=[3]).check_model(config)


@pytest.mark.slow
def test_command_refuses_text_too_short_and_writes_nothing(tmp_path, capsys):

    text = tmp_path / "short.txt"
    text.write_text("A short text. " * 20)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as code:
        run_main(main, ["fig2", "--text", str(text), "--sequences", "1", "--quiet", "--no-png", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and not out.exists() and not list(tmp_path.glob(".out*"))
    assert err.startswith("error: t0 + N = 900 tokens is beyond the text") and "has" in err and "\n" not in err


def test_unknown_mode_is_one_line(capsys):

    with pytest.raises(SystemExit) as code:
        main(["bogus", "--out", "x"])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and err.startswith("error: argument MODE: invalid choice") and "\n" not in err
