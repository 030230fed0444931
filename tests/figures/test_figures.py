"""Every figure from one command; the Fig. 3 replay against the paper's oracle; the long-stream mode."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.figures.pipeline import FIGURES, Figure, FigureRun, Sizes, kept
from analysis.jobs.job import make_jobs
from analysis.perplexity.runner import run_jobs
from analysis.perplexity.stream import check_stream_length, running_curve, stream_windows
from analysis.perplexity.table1 import paired, table_markdown
from analysis.perturbation.toy import toy_replay
from experiments import figures
from experiments.figures import _prepare_partial
from tests.conftest import REPO

CHROMIUM = shutil.which("chromium") is not None
# a few tokens per figure: every builder runs end to end on the real model in about a minute
TINY = Sizes(spectra_sequences=1, spectra_tokens=64, table_documents=2, table_tokens=24, table_window=24,
             stream_documents=2, stream_tokens=24, perturb_sequences=2, fig2_future=12, sweep_tokens=40,
             heads_documents=1, heads_tokens=72, lowrank_documents=1, lowrank_tokens=96, lowrank_fractions=(0.25,),
             retrieval_tokens=96, retrieval_trials=1)


def figures_command(*args):
    return subprocess.run([sys.executable, "-m", "experiments.figures", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def plain_nll(model, ids):
    with torch.inference_mode():
        logits = model(ids).logits
    return -torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]


# --- Fig. 3 -----------------------------------------------------------------------------------------------
def test_fig3_replay_ends_with_the_papers_mixtures():
    steps = toy_replay()
    final = steps[-1]
    assert final.kept == [2, 5, 6, 7]
    e = torch.eye(8)
    oracle = torch.stack([e[0] / 3 + e[1] / 9 + 5 * e[2] / 9,  # v3'' = v1/3 + v2/9 + 5 v3/9
                          4 / 35 * e[3] + 6 / 35 * e[4] + 5 / 7 * e[5],  # v6' = 4/35 v4 + 6/35 v5 + 5/7 v6
                          e[6], e[7]])
    torch.testing.assert_close(torch.tensor(final.mixtures), oracle, rtol=0, atol=1e-6)
    # what each step did, read off the state: v2 -> v3 (1/6 : 5/6), v4 -> v5, v5' -> v6, v1 -> v3'
    assert [(s.victim, s.neighbour) for s in steps[4:]] == [(1, 2), (3, 4), (4, 5), (0, 2)]
    assert all(s.victim is None for s in steps[:4])
    assert steps[4].weights == pytest.approx((1 / 6, 5 / 6))
    assert final.merges == {2: 2, 5: 1}  # v3'' and v6'


# --- the stream mode --------------------------------------------------------------------------------------
def test_stream_full_equals_one_forward(tiny_model, random_ids):
    """Tolerance 1e-5 (float32): token by token through the cache = one forward over the whole stream."""
    model, ids = tiny_model("llama"), random_ids(2, 48, seed=11)
    windows = stream_windows([("a", ids[0].tolist()), ("b", ids[1].tolist())])
    jobs = make_jobs(["full", "weightedkv"], [16], PolicyOptions(sinks=2))
    nll, _ = run_jobs(model, windows, jobs)
    assert [j.key for j in jobs] == ["full@full", "weightedkv@16"]
    expected = plain_nll(model, ids)  # (2, 47): every target from the second token on
    assert nll["full@full"].shape == (2, 47)
    torch.testing.assert_close(nll["full@full"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(nll["weightedkv@16"][:, :15], expected[:, :15], rtol=0, atol=1e-5)  # before any eviction
    assert not torch.allclose(nll["weightedkv@16"][:, 20:], expected[:, 20:], atol=1e-3)  # compression shows


def test_running_curve_mean_and_spread():
    nll = torch.tensor([[1.0, 3.0, 2.0, 2.0], [3.0, 1.0, 2.0, 6.0]])
    curve = running_curve(nll, points=4)
    assert curve["token"] == [1, 2, 3, 4]
    assert curve["mean"] == pytest.approx([2.0, 2.0, 2.0, 2.5])  # running means (1, 2, 2, 2) and (3, 2, 2, 3)
    assert curve["spread"] == pytest.approx([1.0, 0.0, 0.0, 0.5])


def test_stream_longer_than_positions_is_refused():
    with pytest.raises(UserError, match="longer than the model's 8192 positions"):
        check_stream_length(8193, 8192)
    check_stream_length(8192, 8192)


@pytest.mark.slow
def test_stream_command_refuses_a_stream_past_the_positions(tmp_path):
    done = subprocess.run([sys.executable, "-m", "experiments.perplexity", "--stream", "--tokens", "9000",
                           "--out", str(tmp_path / "s")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("error: a stream of 9000 tokens is longer than the model's 8192 "
                                                    "positions; use --tokens 8192 or fewer")
    assert not (tmp_path / "s").exists()


# --- the figures command ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_figures_command_makes_and_then_keeps_fig3(tmp_path):
    """The real command path (no model needed for Fig. 3): HTML and PNG, manifest, resume keeps it."""
    out = tmp_path / "figs"
    png = [] if CHROMIUM else ["--no-png"]
    first = figures_command("--only", "fig3_replay", "--out", str(out), "--quiet", *png)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["figures"]["fig3_replay"]
    assert entry["status"] == "made" and "--only fig3_replay" in entry["command"]
    assert (out / "fig3_replay" / "fig3_replay.html").stat().st_size > 10_000
    if CHROMIUM:
        assert (out / "fig3_replay" / "fig3_replay.png").read_bytes()[:4] == b"\x89PNG"
    again = figures_command("--only", "fig3_replay", "--out", str(out), "--quiet", *png)
    assert again.returncode == 0 and "fig3_replay kept" in again.stdout


def _check_table1(out: Path) -> None:
    table = (out / "table1" / "table.md").read_text()
    for corpus in ("books", "web", "latex", "math"):
        assert f"{corpus} m=12" in table and f"{corpus} m=16" in table
    assert "weightedkv_evict" in table and "±" in table  # 2 documents: a spread
    assert "Paired by document: weightedkv's perplexity is below weightedkv_evict's in" in table
    assert "of 16 (corpus, budget, document) cells" in table  # 4 corpora x 2 budgets x 2 documents


def _check_stream(out: Path) -> None:
    stream = json.loads((out / "fig4_stream" / "stream.json").read_text())
    assert [r["method"] for r in stream["results"]] == ["weightedkv", "weightedkv_evict"]
    assert stream["tokens"] == 24 and len(stream["results"][0]["per_document_nll"]) == 2


FIGURE_CHECKS = {"table1": _check_table1, "fig4_stream": _check_stream}  # beyond the files every figure has
FIGURE_ARGS = ["--quiet", "--budgets", "12,16"] + ([] if CHROMIUM else ["--no-png"])


def _made(out: Path, name: str) -> None:
    """``name`` is in the manifest as made, with its HTML (and, with chromium, PNG) files."""
    entry = json.loads((out / "manifest.json").read_text())["figures"][name]
    assert entry["status"] == "made", name
    html = [f for f in entry["files"] if f.endswith(".html")]
    assert html, name
    for f in html:
        assert (out / f).stat().st_size > 10_000, f
        if CHROMIUM:
            assert (out / f).with_suffix(".png").read_bytes()[:4] == b"\x89PNG", f


# One test per figure, each on the session's model, so the two workers share the figures between them.
@pytest.mark.slow
@pytest.mark.spread
@pytest.mark.parametrize("name", list(FIGURES))
def test_each_figure_on_the_embedded_model(tmp_path, embedded, name):
    out = tmp_path / "figs"
    figures.main(["--out", str(out), "--only", name, *FIGURE_ARGS], sizes=TINY, load=lambda: embedded)
    _made(out, name)
    FIGURE_CHECKS.get(name, lambda out: None)(out)
    assert not (out / ".partial").exists()


@pytest.mark.slow
@pytest.mark.spread
def test_resume_remakes_a_lost_figure_and_keeps_the_others_without_the_model(tmp_path, embedded):
    """On two small figures (one needs the model): a lost one is remade, the kept one never loads the model."""
    out, subset = tmp_path / "figs", ["--only", "fig3_replay,fig1_spectra"]
    figures.main(["--out", str(out), *subset, *FIGURE_ARGS], sizes=TINY, load=lambda: embedded)
    shutil.rmtree(out / "fig3_replay")
    figures.main(["--out", str(out), *subset, *FIGURE_ARGS], sizes=TINY,
                 load=lambda: pytest.fail("kept figures must not load the model"))
    states = {n: e["status"] for n, e in json.loads((out / "manifest.json").read_text())["figures"].items()}
    assert states == {"fig3_replay": "made", "fig1_spectra": "kept"}
    _made(out, "fig3_replay")
    assert kept(out / "fig1_spectra", FIGURES["fig1_spectra"].settings(_run(TINY, [12, 16])))
    assert not kept(out / "fig1_spectra", FIGURES["fig1_spectra"].settings(_run(replace(TINY, spectra_tokens=72),
                                                                                [12, 16])))  # other settings


def _run(sizes, budgets):

    return FigureRun(budgets=budgets, sizes=sizes)


def test_a_failing_figure_is_named_and_the_others_are_made(tmp_path, monkeypatch, capsys):

    def broken(run, directory):
        (directory / "half.html").write_text("half")
        raise RuntimeError("out of paper")

    monkeypatch.setitem(FIGURES, "broken", Figure(broken, lambda r: {}, "always fails", needs_model=False))
    out = tmp_path / "figs"
    with pytest.raises(SystemExit) as exit_:
        figures.main(["--out", str(out), "--only", "broken,fig3_replay", "--quiet", "--no-png"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "error: figure broken could not be made: out of paper" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["figures"]["broken"]["status"] == "failed"
    assert manifest["figures"]["fig3_replay"]["status"] == "made"
    assert not (out / "broken").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.parametrize("case", ["unknown_only", "other_files", "a_file", "foreign_manifest"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    out = tmp_path / "out"
    args = ["--out", str(out), "--no-png"]
    if case == "unknown_only":
        args += ["--only", "fig3_replay,fig9"]
        expected = "error: --only: unknown figure fig9; choose from " + ", ".join(FIGURES)
    elif case == "other_files":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = f"error: --out {out} holds other files (no manifest.json)"
    elif case == "a_file":
        out.write_text("mine")
        expected = f"error: --out {out} is a file, not a figures directory"
    else:
        out.mkdir()
        (out / "manifest.json").write_text('{"name": "something else"}')
        expected = f"error: --out {out} holds a manifest.json that is not a kvlens figures manifest"
    done = figures_command(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), done.stderr
    if case == "other_files":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # untouched


def test_partial_results_of_other_settings_are_dropped(tmp_path):

    partial = tmp_path / ".partial" / "table1"
    _prepare_partial(partial, {"tokens": 384})
    (partial / "weightedkv-128").mkdir()
    (partial / "weightedkv-128" / "0.pt").write_bytes(b"unit")
    _prepare_partial(partial, {"tokens": 384})  # same settings: a resumed run keeps its finished units
    assert (partial / "weightedkv-128" / "0.pt").is_file()
    _prepare_partial(partial, {"tokens": 512})  # other settings: window 0 is another window now
    assert not (partial / "weightedkv-128").exists()


def test_paired_counts_cells_where_merge_has_the_lower_perplexity():

    def entry(corpus, method, budget, docs):
        return {"corpus": corpus, "method": method, "budget": budget, "ppl": 1.0, "ppl_doc_std": 0.0,
                "documents": len(docs), "per_document_ppl": docs}

    table = {"model": "m", "corpora": ["a", "b"], "budgets": [8], "methods": ["weightedkv", "weightedkv_evict"],
             "documents": 2, "tokens": 16, "window": 16, "stride": 8, "sinks": 2,
             "entries": [entry("a", "weightedkv", 8, {"x": 1.0, "y": 3.0}),
                         entry("a", "weightedkv_evict", 8, {"x": 2.0, "y": 3.0}),
                         entry("b", "weightedkv", 8, {"z": 5.0}), entry("b", "weightedkv_evict", 8, {"z": 4.0})]}
    assert paired(table) == (1, 3)  # x lower; y a tie (not lower); z higher
    assert "below weightedkv_evict's in 1 of 3 (corpus, budget, document) cells" in table_markdown(table)
