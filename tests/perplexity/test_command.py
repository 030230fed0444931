"""The perplexity command with plans and with more than one process (torchrun, gloo on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from analysis.errors import UserError
from analysis.jobs.job import Job
from analysis.jobs.plan import Plan
from analysis.models.loading import load_model
from analysis.runtime.decode import window_nll
from tests.conftest import REPO

COMMON = ["--corpus", "books", "--tokens", "96", "--window", "64", "--documents", "2", "--quiet", "--no-png"]


def run(args, launcher=(sys.executable, "-m", "experiments.perplexity")):
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*launcher, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def results(out: Path) -> dict:
    return {(r["method"], r["budget"]): r for r in json.loads((out / "perplexity.json").read_text())["results"]}


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    args = COMMON + ["--budget", "16", "--methods", "weightedkv,cam", "--batch-size", "2"]
    one = run(args + ["--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "experiments.perplexity")
    two = run(args + ["--out", str(tmp_path / "two")], launcher=torchrun)
    assert two.returncode == 0, two.stderr
    a, b = results(tmp_path / "one"), results(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key]["ppl"] == pytest.approx(a[key]["ppl"], rel=1e-5)
        assert b[key]["per_document_ppl"] == pytest.approx(a[key]["per_document_ppl"], rel=1e-4)
    summary = json.loads((tmp_path / "two" / "perplexity.json").read_text())
    assert summary["processes"] == 2 and summary["windows"] == 4
    na, nb = load_file(tmp_path / "one" / "nll.safetensors"), load_file(tmp_path / "two" / "nll.safetensors")
    assert all((na[k] - nb[k]).abs().max() < 1e-4 for k in na)
    assert not list(tmp_path.glob(".two*"))  # rank 0 wrote once; no partial or temp directory left


@pytest.mark.slow
def test_plan_command_equals_uniform_budget_and_checks_it(tmp_path, embedded):
    config = embedded.model.config
    uniform = Plan.uniform(config.num_hidden_layers, config.num_key_value_heads, 16, name="u16")
    plan_file = uniform.save(tmp_path / "u16.json")
    by_budget = run(COMMON + ["--budget", "16", "--methods", "weightedkv", "--out", str(tmp_path / "b")])
    by_plan = run(COMMON + ["--plan", str(plan_file), "--methods", "weightedkv", "--out", str(tmp_path / "p")])
    assert by_budget.returncode == 0 and by_plan.returncode == 0, by_plan.stderr
    a, b = results(tmp_path / "b")["weightedkv", 16], results(tmp_path / "p")["weightedkv", 16]
    assert b["plan"] == "u16" and b["total_slots"] == 16 * config.num_hidden_layers * config.num_key_value_heads
    assert a["ppl"] == b["ppl"]  # a uniform plan is exactly the uniform budget
    bad = Plan([[16] * config.num_key_value_heads] * 3, name="short").save(tmp_path / "short.json")
    for args, message in (
        (["--plan", str(bad)], "3 layers x 3 KV heads, but the model has 30 x 3"),
        (["--plan", str(plan_file), "--total-budget", "1000"], "more than --total-budget 1000"),
        (["--total-budget", "1000"], "--total-budget limits a --plan"),
    ):
        done = run(COMMON + args + ["--methods", "weightedkv", "--out", str(tmp_path / "x")])
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr
        assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    partial = tmp_path / ".x.partial"
    partial.mkdir()
    (partial / "settings.json").write_text(json.dumps({"seed": 5, "tokens": 96}))
    done = run(COMMON + ["--budget", "16", "--methods", "weightedkv", "--out", str(tmp_path / "x")])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "other settings (" in lines[0] and "seed" in lines[0]


def test_device_map(embedded, monkeypatch):
    """--device-map auto on a CPU-only machine puts every layer on the CPU, and the cache works there;
    a model class that declares no unsplittable blocks is refused in one line."""


    loaded = load_model("default", device_map="auto")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(window_nll(loaded.model, ids, Job.of("weightedkv", 16)),
                               window_nll(embedded.model, ids, Job.of("weightedkv", 16)), rtol=0, atol=1e-4)

    monkeypatch.setattr(LlamaForCausalLM, "_no_split_modules", None)
    with pytest.raises(UserError, match="--device-map auto is not supported for it") as err:
        load_model("default", device_map="auto")
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_bytes_without_a_basis_buys_the_budget_once_the_head_dimension_is_known(tmp_path, stream):
    """--bytes 8192 on the embedded model (d = 64, float32: 512 bytes a slot) is --budget 16, for a sweep and a
    stream; the result records the budget the bytes bought."""
    shape = ["--stream", "--tokens", "48", "--documents", "1"] if stream else COMMON
    args = [*shape, "--methods", "weightedkv", "--quiet", "--no-png"]
    by_bytes = run([*args, "--bytes", "8192", "--out", str(tmp_path / "bytes")])
    assert by_bytes.returncode == 0, by_bytes.stderr
    by_budget = run([*args, "--budget", "16", "--out", str(tmp_path / "budget")])
    assert by_budget.returncode == 0, by_budget.stderr
    name = "stream.json" if stream else "perplexity.json"
    timing = ("seconds", "tokens_per_second")
    got, want = ([{k: v for k, v in r.items() if k not in timing} for r in json.loads((tmp_path / d / name).read_text())
                  ["results"]] for d in ("bytes", "budget"))
    assert [r["budget"] for r in got] == [16] and got == want
    nll_bytes, nll_budget = (load_file(tmp_path / d / "nll.safetensors") for d in ("bytes", "budget"))
    assert nll_bytes.keys() == nll_budget.keys() and all(torch.equal(nll_bytes[k], nll_budget[k]) for k in nll_bytes)
