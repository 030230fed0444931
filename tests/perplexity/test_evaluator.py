"""The perplexity evaluator: protocol, exactness of its fast path, resumability, the command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import analysis.perplexity.runner as sweep
from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.jobs.job import Job, make_jobs
from analysis.perplexity.runner import evaluate
from analysis.perplexity.windows import make_windows, running_log_ppl, scored_mask
from analysis.runtime.batching import Batching
from analysis.runtime.decode import window_nll
from tests.conftest import REPO


def job(method: str, budget: int, sinks: int = 2, seed: int = 0) -> Job:
    return Job.of(method, budget, PolicyOptions(sinks=sinks, seed=seed))

def plain_nll(model, ids):
    with torch.inference_mode():
        logits = model(ids).logits
    return -torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


def test_windows_score_every_token_once():
    sequences = [("a", list(range(100))), ("b", list(range(1000, 1100)))]
    w = make_windows(sequences, 40)
    assert w.starts == [0, 20, 40, 60] * 2 and w.scored_from == [1, 20, 20, 20] * 2
    mask = scored_mask(w)
    for doc in ("a", "b"):
        scored = [w.starts[r] + c + 1 for r in range(len(w.docs)) if w.docs[r] == doc
                  for c in range(w.size - 1) if mask[r, c]]
        assert sorted(scored) == list(range(1, 100))  # targets 1..99, each exactly once


def test_bad_windows():
    with pytest.raises(UserError, match="even"):
        make_windows([("a", list(range(50)))], 15)
    with pytest.raises(UserError, match="longer than the 30 tokens"):
        make_windows([("a", list(range(30)))], 40)


def test_full_equals_one_forward(tiny_model, random_ids):
    model, ids = tiny_model("llama"), random_ids(2, 40)
    got = window_nll(model, ids, Job.of("full"), chunk=16)
    assert torch.allclose(got, plain_nll(model, ids), atol=1e-5)


@pytest.mark.parametrize("method", ["weightedkv", "h2o", "cam"])
def test_chunked_prefill_below_budget_is_exact(tiny_model, random_ids, method):
    """The fast path (chunks until the budget is reached) equals one token per forward."""
    model, ids = tiny_model("llama"), random_ids(2, 48, seed=1)
    fast = window_nll(model, ids, job(method, 24), chunk=128)
    slow = window_nll(model, ids, job(method, 24), chunk=1)
    assert torch.allclose(fast, slow, atol=1e-5)
    full = window_nll(model, ids, Job.of("full"))
    assert torch.allclose(fast[:, :23], full[:, :23], atol=1e-5)  # before any compression
    assert not torch.allclose(fast[:, 30:], full[:, 30:], atol=1e-3)  # compression changes the rest


def test_rows_do_not_leak(tiny_model, random_ids):
    model = tiny_model("llama")
    a, b, c = random_ids(1, 40, 2), random_ids(1, 40, 3), random_ids(1, 40, 4)
    ab = window_nll(model, torch.cat([a, b]), job("weightedkv", 16))
    ac = window_nll(model, torch.cat([a, c]), job("weightedkv", 16))
    assert torch.allclose(ab[0], ac[0], atol=1e-5) and not torch.allclose(ab[1], ac[1], atol=1e-3)


def test_evaluate_resumes_per_window_whatever_the_batch_size(tiny_model, random_ids, tmp_path, monkeypatch):

    model = tiny_model("llama")
    w = make_windows([("a", random_ids(1, 120, 5)[0].tolist())], 40)  # 5 windows
    first = evaluate(model, w, job("weightedkv", 16), Batching(batch_size=2, partial=tmp_path))
    assert sorted(p.name for p in (tmp_path / "weightedkv-16").glob("*.pt")) == [f"{i}.pt" for i in range(5)]
    (tmp_path / "weightedkv-16" / "3.pt").unlink()  # as if killed before window 3 was saved
    rows = []
    real = sweep.decode_rows
    monkeypatch.setattr(sweep, "decode_rows", lambda m, ids, *a, **k: rows.append(len(ids)) or real(m, ids, *a, **k))
    again = evaluate(model, w, job("weightedkv", 16), Batching(batch_size=4, partial=tmp_path))  # another batch size
    assert rows == [1]  # only the missing window was recomputed
    assert again["ppl"] == pytest.approx(first["ppl"], rel=1e-6) and again["tokens"] == 119
    with pytest.raises(UserError, match="same as method 'full'"):
        evaluate(model, w, Job.of("weightedkv", 40))


def test_tail_window_scores_the_rest():
    """--tokens 3000 --window 1024: the stride stops at 2560, a last window aligned to the end scores the rest."""
    w = make_windows([("a", list(range(3000)))], 1024)
    assert w.starts == [0, 512, 1024, 1536, 1976] and w.scored_from == [1, 512, 512, 512, 584]
    mask = scored_mask(w)
    scored = sorted(w.starts[r] + c + 1 for r in range(len(w.docs)) for c in range(w.size - 1) if mask[r, c])
    assert scored == list(range(1, 3000))  # every target once, none left unscored


@pytest.mark.parametrize("method", ["cam", "random"])
def test_randomised_window_result_does_not_depend_on_batch_size(tiny_model, random_ids, method):
    model = tiny_model("llama")
    w = make_windows([("a", random_ids(1, 120, 6)[0].tolist())], 40)  # 5 windows
    alone = evaluate(model, w, job(method, 12), Batching(batch_size=1))["nll"]
    three = evaluate(model, w, job(method, 12), Batching(batch_size=3))["nll"]
    torch.testing.assert_close(alone, three, rtol=0, atol=1e-5)
    if method == "random":  # (CaM's gate is saturated on this tiny model: p >= 1 whatever the draw)
        other_seed = evaluate(model, w, job(method, 12, seed=1), Batching(batch_size=3))["nll"]
        assert not torch.allclose(three, other_seed, atol=1e-4)  # the seed does reach the draws


def test_sweep_jobs_share_rows_and_equal_one_by_one(tiny_model, random_ids, monkeypatch):
    """Fewer windows than the batch: jobs run side by side, each row under its own policy."""

    model = tiny_model("llama")
    w = make_windows([("a", random_ids(1, 40, 7)[0].tolist())], 40)  # one window
    methods = ["weightedkv", "h2o", "tova", "streaming_llm", "cam"]
    jobs = make_jobs(methods, [12], PolicyOptions(sinks=2), window=40)
    calls = []
    real = sweep.decode_rows
    monkeypatch.setattr(sweep, "decode_rows", lambda m, ids, *a, **k: calls.append(len(ids)) or real(m, ids, *a, **k))
    together, _ = sweep.run_jobs(model, w, jobs)
    assert calls == [len(methods)]  # one decode for the whole sweep
    for job in jobs:
        alone = window_nll(model, w.ids, job, window_ids=[0])
        torch.testing.assert_close(together[job.key], alone, rtol=0, atol=1e-5)


def _command(*args, cwd):
    return subprocess.run([sys.executable, "-m", "experiments.perplexity", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_writes_results(tmp_path):
    out = tmp_path / "ppl"
    done = _command("--corpus", "books", "--tokens", "96", "--window", "64", "--budget", "16,32",
                    "--methods", "full,weightedkv,weightedkv_evict", "--out", str(out), "--quiet", "--no-png", cwd=REPO)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "perplexity.json").read_text())
    runs = {(r["method"], r["budget"]) for r in summary["results"]}
    assert runs == {("full", 64), ("weightedkv", 16), ("weightedkv", 32),
                    ("weightedkv_evict", 16), ("weightedkv_evict", 32)}
    assert all(r["ppl"] > 1 and r["tokens"] == 95 and r["corpus"] == "books" for r in summary["results"])
    assert len(summary["results"][0]["running_log_ppl"]) > 10
    assert "| weightedkv |" in (out / "table.md").read_text()
    assert (out / "ppl_vs_budget.html").is_file() and (out / "nll.safetensors").is_file()
    assert not list(tmp_path.glob(".ppl*"))  # no partial or temp directory left


@pytest.mark.parametrize("args, message", [
    (["--budget", "64"], "same as method 'full'"),
    (["--budget", "32", "--methods", "weightedkv,nope"], "valid: full, streaming_llm"),
    (["--budget", "4"], "must exceed sinks"),
    (["--budget", "32", "--tokens", "32"], "shorter than --window"),
    (["--stream", "--budget", "16", "--methods", "full,nope"], "valid: full, streaming_llm"),  # before loading
])
def test_command_bad_input(tmp_path, args, message):
    done = _command("--tokens", "128", "--window", "64", *args, "--out", str(tmp_path / "x"), "--quiet", cwd=REPO)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "x").exists()


def test_evaluator_leaves_the_model_as_it_was(tiny_model, random_ids):
    model = tiny_model("llama")
    assert model.config._attn_implementation == "eager"
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    window_nll(model, random_ids(1, 24), job("weightedkv", 12))
    assert model.config._attn_implementation == "eager"  # kvlens attention only inside the call
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def test_per_document_perplexity(tiny_model, random_ids):
    """Equal-length documents: the overall log-perplexity is the mean of the per-document ones."""
    model = tiny_model("llama")
    docs = [("a", random_ids(1, 80, 8)[0].tolist()), ("b", random_ids(1, 80, 9)[0].tolist())]
    result = evaluate(model, make_windows(docs, 40), job("weightedkv", 16))
    per = result["per_document_ppl"]
    assert set(per) == {"a", "b"} and per["a"] != per["b"]
    assert result["ppl"] == pytest.approx(math.exp((math.log(per["a"]) + math.log(per["b"])) / 2), rel=1e-4)
    with pytest.raises(UserError, match="--batch-size"):
        evaluate(model, make_windows(docs, 40), Job.of("weightedkv", 16), Batching(batch_size=0))


def test_running_log_ppl_is_the_mean_of_each_documents_running_mean():
    """Hand-made NLLs: doc a scores 1, 2, 3, ... and doc b a constant 4, in token order."""
    w = make_windows([("a", list(range(40))), ("b", list(range(40)))], 20)  # windows start 0, 10, 20 each
    nll = torch.zeros(len(w.docs), w.size - 1)
    mask = scored_mask(w)
    for row, doc in enumerate(w.docs):
        targets = torch.arange(1, w.size) + w.starts[row]  # target index of each prediction
        nll[row] = targets.float() if doc == "a" else 4.0
    curve = running_log_ppl(w, nll, points=39)
    assert len(curve) == 39  # 39 scored targets per document, one point each
    for i, value in enumerate(curve):
        a = sum(range(1, i + 2)) / (i + 1)  # running mean of 1..i+1
        assert value == pytest.approx((a + 4.0) / 2, abs=1e-5)
    assert mask.sum() == 2 * 39
    halved = running_log_ppl(w, nll, points=13)  # fewer points: every third target
    assert halved == [curve[i] for i in range(2, 39, 3)]
