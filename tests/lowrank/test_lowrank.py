"""Low-rank keys (issue 18): the basis, the cache's codec, byte accounting, refusals. Tiny random models only."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.jobs.basis import Basis, LowRank, slot_bytes, slots_for_bytes
from analysis.jobs.job import Job, make_jobs
from analysis.lowrank.calibrate import basis_from_capture, check_disjoint, held_out, text_hash
from analysis.lowrank.compare import Config, config_bytes, parse_key_specs, plan_configs
from analysis.lowrank.cost import KINDS, rank_correlation, rank_costs
from analysis.perplexity.settings import bytes_budget, lowrank_options, with_lowrank
from analysis.retrieval.grid import retrieval_settings
from analysis.retrieval.run import Unit, run_batch
from analysis.runtime.cache import CompressedCache
from analysis.runtime.capture import apply_rope, record
from analysis.runtime.channels import Rotary
from analysis.spectra.compute import compute_spectra
from analysis.text.corpora import Document
from experiments import lowrank, perplexity
from experiments.common import run_main
from tests.conftest import build_tiny
from tests.retrieval.test_retrieval import tiny_prompt

D = 16  # the tiny Llama's head_dim (64 hidden / 4 heads)


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def capture_of(model, ids):
    with record(model, kinds=("key_pre_rope", "value", "key_post_rope")) as rec, torch.no_grad():
        model(ids)
    return rec.result({"model": "tiny-llama"})


@pytest.fixture(scope="module")
def basis(llama, random_ids):
    return basis_from_capture(capture_of(llama, random_ids(2, 40, seed=5)), llama)


def logits(model, ids, cache=None):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=cache is not None).logits


# --- the basis --------------------------------------------------------------------------------------
def test_rank_r_error_is_the_spectra_energy(llama, random_ids):
    capture = capture_of(llama, random_ids(1, 48, seed=3))  # one sequence: pooled == per-sequence
    basis = basis_from_capture(capture, llama)
    spectra = compute_spectra(capture, kinds=["key_pre_rope"])
    for layer, head, r in [(0, 0, 1), (1, 1, 3), (3, 0, 8)]:
        x = capture.get(layer, "key_pre_rope")[0, head].double()  # (T, D)
        v = basis.vectors["key_pre_rope"][basis.row(layer), head, :, :r].double()  # (D, r)
        error = ((x - x @ v @ v.T).square().sum() / x.square().sum()).item()
        reported = spectra.select("key_pre_rope", layer, head)[0].cumulative_energy[r - 1]
        assert error == pytest.approx(1 - reported, abs=1e-5)
        assert 1 - basis.energy["key_pre_rope"][basis.row(layer), head, r - 1].item() == pytest.approx(error, abs=1e-5)


def test_centred_basis_keeps_the_mean(llama, random_ids):
    capture = capture_of(llama, random_ids(1, 48, seed=3))
    basis = basis_from_capture(capture, llama, center=True)
    x = capture.get(2, "key_pre_rope")[0, 1].double()
    assert torch.allclose(basis.mean["key_pre_rope"][2, 1].double(), x.mean(0), atol=1e-5)
    assert not basis.mean["value"].any()  # values are never centred (merges are linear)
    centred = compute_spectra(capture, kinds=["key_pre_rope"], center=True).select("key_pre_rope", 2, 1)[0]
    assert basis.energy["key_pre_rope"][2, 1, 3].item() == pytest.approx(centred.cumulative_energy[3], abs=1e-5)
    ids = random_ids(1, 12, seed=4)
    with CompressedCache(llama, "full", None, key_basis=basis, key_rank=D) as cache:  # the mean comes back exactly
        assert torch.allclose(logits(llama, ids, cache), logits(llama, ids), atol=1e-4)


def test_energy_ranks_and_bad_ranks(basis):
    ranks = basis.ranks("key_pre_rope", energy=0.9)
    cum = basis.energy["key_pre_rope"]
    for (layer, head), r in zip([(0, 0), (3, 1)], [ranks[0, 0], ranks[3, 1]]):
        assert cum[layer, head, r - 1] >= 0.9 - 1e-6 and (r == 1 or cum[layer, head, r - 2] < 0.9)
    assert (basis.ranks("value", energy=1.0) <= D).all()
    for bad in (dict(rank=0), dict(rank=D + 1), dict(energy=0.0), dict(energy=1.5), dict(rank=2, energy=0.5)):
        with pytest.raises(UserError):
            basis.ranks("key_pre_rope", **bad)


def test_basis_file_round_trip_and_other_model_refused(basis, tmp_path, llama):
    basis.save(tmp_path / "b")
    loaded = Basis.load(tmp_path / "b")
    assert torch.equal(loaded.vectors["key_pre_rope"], basis.vectors["key_pre_rope"])
    loaded.check(llama)
    with pytest.raises(UserError, match="another model"):
        loaded.check(build_tiny("llama", seed=1))  # same shape, other weights
    with pytest.raises(UserError, match="another model"):
        CompressedCache(build_tiny("qwen2"), "full", None, key_basis=tmp_path / "b", key_rank=4)
    with pytest.raises(UserError, match="not a basis"):
        Basis.load(tmp_path)


def test_calibration_and_evaluation_must_not_overlap(basis):
    docs = [Document("books/a", "books", "alpha text"), Document("books/b", "books", "beta text")]
    seen = {"documents": [{"id": "books/a", "sha256": text_hash("alpha text")}]}
    calibrated = Basis(**{p: getattr(basis, p) for p in ("vectors", "mean", "energy")}, layers=basis.layers,
                       shape=basis.shape, calibration=seen)
    with pytest.raises(UserError, match="overlap"):
        check_disjoint(calibrated, docs)
    with pytest.raises(UserError, match="overlap"):  # the same text under another name
        check_disjoint(calibrated, [Document("text/copy.txt", "text", "alpha text")])
    with pytest.raises(UserError, match="overlap"):  # a chunk of a calibration document
        check_disjoint(calibrated, [Document("books/a#1", "books", "other")])
    assert [d.id for d in held_out(calibrated, docs)] == ["books/b"]
    check_disjoint(calibrated, docs[1:])


# --- RoPE -------------------------------------------------------------------------------------------
def test_rope_after_reconstruction_equals_reconstructing_the_post_rope_key(llama, random_ids, basis):
    capture = capture_of(llama, random_ids(1, 24, seed=7))
    pre, post = capture.get(1, "key_pre_rope"), capture.get(1, "key_post_rope")  # (1, H, T, D)
    positions = torch.arange(pre.shape[2])[None]
    rotary = Rotary(llama, 1)
    assert torch.allclose(rotary.rotate(post, positions, inverse=True), pre, atol=1e-5)  # inverse is exact
    v = basis.vectors["key_pre_rope"][1, :, :, :5]  # (H, D, 5)
    from_pre = apply_rope(llama, pre @ v @ v.transpose(-1, -2), positions, layer=1)
    from_post = apply_rope(llama, rotary.rotate(post, positions, inverse=True) @ v @ v.transpose(-1, -2), positions, 1)
    assert torch.allclose(from_pre, from_post, atol=1e-5)
    per_head = rotary.rotate(pre, positions[:, None].expand(1, pre.shape[1], -1))  # (B, H, T) positions
    assert torch.allclose(per_head, post, atol=1e-5)


# --- the cache --------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,budget", [("full", None), ("weightedkv", 12), ("h2o", 12)])
def test_rank_d_keys_change_nothing(llama, random_ids, basis, method, budget):
    ids = random_ids(2, 20, seed=9)
    with CompressedCache(llama, method, budget, sinks=2) as plain:
        ref = torch.cat([logits(llama, ids[:, :10], plain)] + [logits(llama, ids[:, t:t + 1], plain)
                                                                for t in range(10, 20)], 1)
    with CompressedCache(llama, method, budget, sinks=2, lowrank=LowRank(basis, key_rank=D, value_rank=D)) as low:
        out = torch.cat([logits(llama, ids[:, :10], low)] + [logits(llama, ids[:, t:t + 1], low)
                                                             for t in range(10, 20)], 1)
        assert low.layers[0].state.keys.shape[-1] == D
    assert torch.allclose(out, ref, atol=1e-4)
    if budget:
        for layer in range(4):
            assert torch.equal(plain.kept_positions(layer), low.kept_positions(layer))


def test_low_rank_keys_are_the_projection(llama, random_ids, basis):
    """Rank r < d: the cache's attention sees exactly the projected pre-RoPE keys, rotated back."""
    ids = random_ids(1, 16, seed=2)
    r = 4
    with CompressedCache(llama, "full", None, key_basis=basis, key_rank=r) as cache:
        logits(llama, ids, cache)
        layer = cache.layers[0]  # the first layer: later layers' inputs already differ from the full model's
        keys, _ = layer.codec.decode(layer.state.keys, layer.state.values, layer.state.positions)
    capture = capture_of(llama, ids)
    v = basis.vectors["key_pre_rope"][0, :, :, :r]
    expected = apply_rope(llama, capture.get(0, "key_pre_rope") @ v @ v.transpose(-1, -2), torch.arange(16)[None], 0)
    assert torch.allclose(keys, expected, atol=1e-5)
    assert not torch.allclose(keys, capture.get(0, "key_post_rope"), atol=1e-3)  # rank 4 of 16 does lose something
    assert cache.layers[2].state.keys.shape[-1] == r  # r coefficients stored, not d


def test_generate_with_low_rank_keys_and_weightedkv(llama, random_ids, basis):
    ids = random_ids(1, 20, seed=4)
    with CompressedCache(llama, "weightedkv", 10, sinks=2, key_basis=basis, key_energy=0.9) as cache:
        out = llama.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=6,
                             min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 26)
    assert int(cache.layers[0].state.n_valid().max()) == 10


def test_bytes_by_hand(llama, random_ids, basis):
    """2 rows, 4 layers x 2 KV heads, budget 8 after 20 tokens, key rank 4, head_dim 16, float32:
    logical = 2 rows x 4 layers x 2 heads x 8 slots x (4 + 16) x 4 B = 10,240 B (full keys: 16,384 B)."""
    ids = random_ids(2, 20, seed=6)
    with CompressedCache(llama, "streaming_llm", 8, sinks=2, key_basis=basis, key_rank=4) as cache:
        logits(llama, ids[:, :8], cache)
        for t in range(8, 20):
            logits(llama, ids[:, t:t + 1], cache)
        memory = cache.memory()
    assert memory["logical_bytes"] == 2 * 4 * 2 * 8 * (4 + 16) * 4 == 10240
    assert memory["slots"] == 2 * 4 * 2 * 8
    assert memory["physical_bytes"] == 4 * (2 * 2 * 9 * 4 + 2 * 2 * 9 * 16) * 4  # capacity budget + 1
    assert memory["basis_bytes"] == 4 * (2 * 16 * 4 + 2 * 16) * 4  # vectors (H, D, r) and mean (H, D), per layer


def test_per_head_ranks_count_their_own_bytes(llama, random_ids, basis):
    ids = random_ids(1, 12, seed=1)
    lowrank = LowRank(basis, key_energy=0.8)
    ranks = lowrank.ranks("key_pre_rope")  # (L, H)
    with CompressedCache(llama, "full", None, lowrank=lowrank) as cache:
        logits(llama, ids, cache)
        memory = cache.memory()
    assert memory["logical_bytes"] == int((ranks + D).sum()) * 12 * 4
    # physical: each layer pads its heads to its largest rank (1 row, 2 heads, 12 slots, float32)
    assert memory["physical_bytes"] == sum(2 * 12 * (int(r) + D) * 4 for r in ranks.max(1).values)


def test_bad_low_rank_options(basis):
    for bad in (dict(key_rank=0), dict(key_rank=D + 1), dict(key_energy=0.0), dict(key_energy=1.01), dict()):
        with pytest.raises(UserError):
            LowRank(basis, **bad)
    with pytest.raises(UserError, match="needs a basis"):
        LowRank.of(None, key_rank=4)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_key_norm_families_project_the_normed_pre_rope_key(tiny_model, random_ids, family):
    """Qwen3 / Gemma 3 normalise keys before RoPE: the basis is of the normed key (the capture's
    key_pre_rope), and the cache recovers that same vector by inverting RoPE, so rank d is exact."""
    model = tiny_model(family)
    ids = random_ids(1, 12, seed=8)
    basis = basis_from_capture(capture_of(model, ids), model)
    d = basis.head_dim
    with CompressedCache(model, "full", None, key_basis=basis, key_rank=d) as cache:
        out = logits(model, ids, cache)
    assert torch.allclose(out, logits(model, ids), atol=1e-4)
    with CompressedCache(model, "full", None, key_basis=basis, key_rank=2) as cache:
        assert not torch.allclose(logits(model, ids, cache), out, atol=1e-3)


# --- equal bytes and the commands' bad input ---------------------------------------------------------
def test_equal_bytes_by_hand():
    budget = 0.25 * 1024 * 2 * 64 * 4  # a quarter of a 1024-token float32 cache, d = 64, per (layer, KV head)
    assert slots_for_bytes(budget, slot_bytes(64, 4)) == 256  # B / (2 d dtype)
    assert slots_for_bytes(budget, slot_bytes(64, 4, key_width=8)) == 455  # B / ((r + d) dtype) = 131072 / 288
    assert slots_for_bytes(budget, slot_bytes(64, 4, 8, 24)) == 1024  # keys and values in 8 + 24
    with pytest.raises(UserError, match="smallest cache"):
        slots_for_bytes(5 * 512, slot_bytes(64, 4))  # 5 slots < sinks + 2


def test_compare_configs_fill_the_same_bytes(basis):
    configs = plan_configs([0.25], D, 64, key_specs=parse_key_specs("4", basis), token_methods=("tova",),
                           merge_methods=("weightedkv",), combine_methods=("tova",), sinks=2)
    by_name = {c.name: c for c in configs}
    assert {"full", "full+k4", "tova@16", "weightedkv@16", "full+k4+v4", "tova@25+k4"} <= set(by_name)
    full = config_bytes(by_name["full"], 4, 2, D, 64, 4)
    assert full == 4 * 2 * 64 * 32 * 4
    for name in ("tova@16", "full+k4+v4", "tova@25+k4"):  # at most a quarter, and within one slot of it
        spent = config_bytes(by_name[name], 4, 2, D, 64, 4)
        assert full / 4 - 4 * 2 * (4 + D) * 4 < spent <= full / 4
    assert Config("token", "h2o", 8).name == "h2o@8"


@pytest.fixture
def basis_dir(basis, tmp_path):
    return str(basis.save(tmp_path / "basis"))


@pytest.mark.parametrize("argv,message", [
    (["--key-rank", "0"], "out of 1..16"),
    (["--key-rank", "17"], "out of 1..16"),
    (["--key-energy", "1.5"], "outside (0, 1]"),
    (["--key-energy", "0"], "outside (0, 1]"),
    (["--key-rank", "4", "--bytes", "100"], "smallest cache"),
])
def test_perplexity_command_refuses_bad_low_rank_options(basis_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        run_main(perplexity.main, ["--key-basis", basis_dir, *argv, "--out", str(tmp_path / "o")])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.mark.parametrize("argv,message", [
    (["--fractions", "1.5"], "not in (0, 1)"),
    (["--fractions", "x"], "not a comma list"),
    (["--key-ranks", "0"], "out of 1..16"),
    (["--key-ranks", "1.5"], "outside (0, 1]"),
])
def test_compare_command_refuses_bad_input(basis_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        run_main(lowrank.main, ["compare", "--basis", basis_dir, *argv, "--out", str(tmp_path / "o")])
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


def test_compare_refuses_text_overlapping_the_calibration(basis, tmp_path, capsys):
    (tmp_path / "eval.txt").write_text("the calibration text")
    seen = {"documents": [{"id": "books/x", "sha256": text_hash("the calibration text")}]}
    Basis(**{p: getattr(basis, p) for p in ("vectors", "mean", "energy")}, layers=basis.layers,
          shape=basis.shape, calibration=seen).save(tmp_path / "b")
    with pytest.raises(SystemExit) as exit:
        run_main(lowrank.main, ["compare", "--basis", str(tmp_path / "b"), "--text", str(tmp_path / "eval.txt"),
                                "--out", str(tmp_path / "o")])
    assert exit.value.code == 2 and "overlap" in capsys.readouterr().err


def test_rank_cost_is_zero_at_rank_d_and_grows_as_r_falls(llama, random_ids, basis):
    with record(llama, kinds=KINDS) as rec, torch.no_grad():
        llama(random_ids(1, 32, seed=12))
    rows = rank_costs(llama, rec.result({"model": "tiny"}), basis, [2, D])
    full = [r["output_error"] for r in rows if r["rank"] == D]
    low = [r["output_error"] for r in rows if r["rank"] == 2]
    assert len(full) == 4 * 2 and max(full) < 1e-5 and min(low) > 1e-4
    assert all(r["calibration_energy"] == pytest.approx(1.0, abs=1e-5) for r in rows if r["rank"] == D)
    hand = [{"rank": 1, "key_rank_90": k, "output_error": e} for k, e in [(1, 0.1), (2, 0.3), (3, 0.2), (4, 0.9)]]
    assert rank_correlation(hand, 1) == pytest.approx(0.8)  # Spearman: ranks (1,2,3,4) vs (1,3,2,4)


def test_bytes_budget_of_the_perplexity_command(basis):
    assert bytes_budget(16 * 2 * D * 4, D, 4) == 16  # full keys: B / (2 d dtype)
    assert bytes_budget(16 * 2 * D * 4, D, 4, LowRank(basis, key_rank=4)) == 25  # 2048 / ((4 + 16) 4) = 25.6
    lowrank = LowRank(basis, key_energy=0.9)
    mean = float(lowrank.ranks("key_pre_rope").float().mean())
    assert bytes_budget(2048, D, 4, lowrank) == int(2048 // ((mean + D) * 4))  # per-head ranks: their mean
    jobs = with_lowrank(make_jobs(["tova"], [16]), LowRank(basis, key_rank=4))
    assert [j.key for j in jobs] == ["tova@16+k4"]
    with pytest.raises(UserError, match="needs --key-rank"):
        lowrank_options("somewhere")


def test_retrieval_holds_its_keys_in_low_rank(llama, basis):
    """The retrieval probe runs the same low-rank cache: rank d changes nothing, rank 2 moves the answer."""
    job = Job.of("weightedkv", 16, PolicyOptions(sinks=2))

    def answer_logprobs(lowrank):
        units = [Unit(replace(job, lowrank=lowrank), tiny_prompt(t)) for t in range(2)]
        return [r["answer_logprob"] for r in run_batch(llama, units, "decode")]

    plain = answer_logprobs(None)
    assert answer_logprobs(LowRank.of(basis, key_rank=D)) == pytest.approx(plain, abs=1e-4)
    low = answer_logprobs(LowRank.of(basis, key_rank=2))
    assert max(abs(a - b) for a, b in zip(low, plain)) > 1e-3
    settings = retrieval_settings("passkey", lengths=[64], budget=[16], methods="full,weightedkv",
                                  lowrank=LowRank.of(basis, key_rank=2))
    assert settings.record()["lowrank"] == LowRank.of(basis, key_rank=2).tag
    assert all(j.lowrank is not None for j in settings.jobs)
