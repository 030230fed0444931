"""Dashboard pages under Streamlit's AppTest: home (captures), Generate (embedded model), Perplexity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from analysis.app import background, dashboard, starter
from analysis.jobs.job import Job
from analysis.models.loading import LoadedModel
from analysis.perturbation.study import Settings, run_study
from analysis.report.retrieval import save_retrieval
from analysis.report.save import save_study
from analysis.retrieval.run import Unit, run_units
from analysis.retrieval.summary import by_fate, cells
from analysis.runtime.capture import capture_sequences
from analysis.runtime.runs import load_run, save_run
from tests.conftest import REPO
from tests.retrieval.test_retrieval import tiny_prompt


def app(name: str):

    return AppTest.from_file(str(REPO / name), default_timeout=120)


def titles(at) -> list[str]:
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]


@pytest.fixture(autouse=True)
def no_leftover_workers():
    """End the starter workers a page started during the test (they would go on computing the whole set)."""
    yield
    background.stop_started()


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """An empty runs folder that the pages use, and an empty starter-set folder."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("KVLENS_RUNS", str(root))
    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path / "starter"))
    return root


@pytest.fixture
def tiny_capture(runs, tiny_model):
    """A saved capture of the tiny llama (4 layers, 2 KV heads, head_dim 16): 1 x 24 tokens."""

    loaded = LoadedModel(tiny_model("llama"), None, "tiny-llama", torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 100, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    return save_run(capture_sequences(loaded, [("s0", ids)], progress=False), runs / "tiny")


def test_home_with_a_capture(tiny_capture):
    at = app("app.py").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="run").value.name == "tiny"
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["model"] == "tiny-llama" and metrics["KV heads × head dim"] == "2 × 16"
    assert len(at.get("plotly_chart")) == 1


def test_home_without_runs_shows_the_starter(tiny_capture, runs):


    shutil.move(tiny_capture, starter.capture_dir())  # as if computed on an earlier first open
    at = app("app.py").run()
    assert not at.exception and not at.error
    assert "No runs in" in at.info[0].value and "starter capture" in at.info[0].value
    assert at.selectbox(key="run").value == dashboard.STARTER_LABEL
    assert {m.label: m.value for m in at.metric}["model"] == "tiny-llama" and len(at.get("plotly_chart")) == 1


@pytest.mark.slow
def test_generate_page():
    at = app("pages/2_Generate.py").run()
    assert not at.exception and not at.error
    assert "Emma" in at.text_area(key="prompt").value or "Write" in at.text_area(key="prompt").value
    assert "An example with the default settings" in at.info[0].value  # first open: the defaults, generated
    assert [s.value for s in at.subheader] == ["weightedkv (budget 64)", "full cache"] and len(titles(at)) == 2
    at.slider(key="budget").set_value(16)
    at.number_input(key="new").set_value(4)
    at.button(key="generate").click().run()
    assert not at.exception and not at.error
    assert [s.value for s in at.subheader] == ["weightedkv (budget 16)", "full cache"]
    assert [c.value for c in at.caption if c.value.startswith("4 new tokens")] and len(at.markdown) == 2
    assert all(m.value.startswith("> ") and len(m.value) > 3 for m in at.markdown)
    assert titles(at)[0] == "Cache occupancy per layer after generation"
    occupancy = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert max(occupancy[0]["y"]) == 16 and min(occupancy[1]["y"]) > 16  # compressed vs full
    at.slider(key="layer").set_value(2).run()
    at.selectbox(key="head").set_value(1).run()
    assert not at.exception and titles(at)[1].startswith("Layer 2: 16 of ")
    at.number_input(key="sinks").set_value(16)
    at.button(key="generate").click().run()
    assert not at.exception and "leaves no room" in at.error[0].value


def write_sweep(root: Path) -> Path:
    """A tiny perplexity.json as experiments.perplexity writes it."""
    curve = [3.0, 2.9, 2.8, 2.75]
    results = [{"method": "full", "budget": 32, "ppl": 10.0, "tokens": 95, "seconds": 0.5,
                "tokens_per_second": 190.0, "running_log_ppl": curve, "corpus": "books"}]
    for method, slower in (("weightedkv", 1.1), ("streaming_llm", 1.3)):
        for budget in (8, 16):
            results.append({"method": method, "budget": budget, "ppl": 10.0 * slower * (32 / budget) ** 0.1,
                            "tokens": 95, "seconds": 1.0, "tokens_per_second": 95.0,
                            "running_log_ppl": [v * slower for v in curve], "corpus": "books"})
    summary = {"model": "tiny", "source": {"corpus": "books"}, "tokens": 64, "documents": 1, "window": 32,
               "stride": 16, "windows": 3, "sinks": 4, "recent": None, "seed": 0, "device": "cpu",
               "text_ids": ["austen/emma"], "methods": ["full", "streaming_llm", "weightedkv"], "budgets": [8, 16],
               "results": results}
    out = root / "sweep"
    out.mkdir()
    (out / "perplexity.json").write_text(json.dumps(summary))
    return out


def test_perplexity_page(runs):

    starter.root().mkdir()
    write_sweep(starter.root()).rename(starter.sweep_dir())  # as if computed on a first open
    at = app("pages/3_Perplexity.py").run()
    assert not at.exception and "No perplexity sweeps" in at.info[0].value
    assert at.selectbox(key="sweep").value == dashboard.STARTER_LABEL and len(titles(at)) == 2
    write_sweep(runs)
    at = app("pages/3_Perplexity.py").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="sweep").value == "sweep"
    table = at.dataframe[0].value
    assert list(table["method"]) == ["full", "streaming_llm", "weightedkv"]
    assert list(table.columns) == ["method", "m=8", "m=16"] and table["m=16"][0] == 10.0
    assert titles(at)[0].startswith("Perplexity vs cache size — tiny")
    assert titles(at)[1].startswith("Running log-perplexity, m=8")
    assert len(json.loads(at.get("plotly_chart")[1].proto.spec)["data"]) == 3
    at.selectbox(key="curve_budget").set_value(16).run()
    at.multiselect(key="curve_methods").set_value(["weightedkv"]).run()
    assert not at.exception and titles(at)[1].startswith("Running log-perplexity, m=16")
    assert [t["name"] for t in json.loads(at.get("plotly_chart")[1].proto.spec)["data"]] == ["weightedkv (m=16)"]
    speed = at.dataframe[1].value  # one row per decode group: methods at one budget share a batch
    assert list(speed["tokens/s"]) == [190.0, 95.0, 95.0] and list(speed["seconds"]) == [0.5, 2.0, 2.0]
    assert list(speed["decoded together"]) == ["full", "weightedkv, streaming_llm", "weightedkv, streaming_llm"]


def test_home_captures_a_run_on_the_embedded_model(runs):
    """The sidebar form captures real text with the embedded model and saves a run that then loads."""
    at = app("app.py").run()
    at.number_input(key="tokens").set_value(32)
    at.text_input(key="name").set_value("quick")
    at.button[0].click().run()
    assert not at.exception and not at.error

    assert at.selectbox(key="run").value == runs / "quick"  # the new run is shown
    capture = load_run(runs / "quick")
    assert capture.meta["source"] == {"corpus": "books"} and capture.meta["tokens"] == 32
    assert capture.get(29, "value").shape == (1, 3, 32, 64)


def test_perturbation_page(runs, tiny_model):
    """A saved study of every mode opens with its figures; moving a selector redraws without error."""

    loaded = LoadedModel(tiny_model("llama"), None, "tiny-llama", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    seqs = [(f"s{i}", torch.randint(0, 100, (40,), generator=gen).tolist()) for i in range(2)]
    fig2 = Settings("fig2", 40, t0=20, future=20, sinks=2)
    save_study(starter.fig2_dir(), *run_study(loaded, seqs, fig2), png=False)  # as if set-up had made it
    at = app("pages/4_Perturbation.py").run()
    assert not at.exception and not at.error and "No perturbation studies" in at.info[0].value
    assert at.selectbox(key="study").value == starter.FIG2_LABEL and len(at.get("plotly_chart")) == 3
    for settings in (fig2,
                     Settings("sweep", 40, methods=["weightedkv", "weightedkv_evict"], budgets=[12, 16], sinks=2),
                     Settings("end2end", 40, methods=["weightedkv", "h2o"], budgets=[12], sinks=2),
                     Settings("ideal", 40, steps=[20], future=8, sinks=2)):
        save_study(runs / settings.mode, *run_study(loaded, seqs, settings), png=False)
    at = app("pages/4_Perturbation.py").run()
    assert at.selectbox(key="study").options[-1] == dashboard.starter.FIG2_LABEL and not at.info
    for mode, charts in (("fig2", 3), ("sweep", 2), ("end2end", 3), ("ideal", 1)):
        at = app("pages/4_Perturbation.py")
        at.session_state["study"] = mode
        at.run()
        assert not at.exception and not at.error, mode
        assert len(at.get("plotly_chart")) == charts, mode
    at.selectbox(key="layer").set_value(0).run()
    assert not at.exception and "layer 0" in titles(at)[0]
    at = app("pages/4_Perturbation.py")
    at.session_state["study"] = "sweep"
    at.run()
    at.selectbox(key="budget").set_value(16).run()
    at.selectbox(key="method").set_value("weightedkv_evict").run()
    assert not at.exception and "weightedkv_evict, m=16" in titles(at)[0]


@pytest.mark.slow
def test_perturbation_page_runs_a_small_study_on_the_embedded_model(runs):
    at = app("pages/4_Perturbation.py").run()
    at.selectbox(key="new_mode").set_value("fig2")
    at.number_input(key="new_sequences").set_value(1)
    at.number_input(key="new_t0").set_value(20)
    at.number_input(key="new_future").set_value(12)
    at.text_input(key="new_layers").set_value("0,29")
    at.text_input(key="new_name").set_value("small")
    at.button[0].click().run()
    assert not at.exception and not at.error
    summary = json.loads((runs / "small" / "perturbation.json").read_text())
    assert summary["mode"] == "fig2" and summary["layers"] == [0, 29] and summary["tokens"] == 32
    assert at.selectbox(key="study").value == "small" and len(at.get("plotly_chart")) == 3


@pytest.mark.slow
def test_two_sessions_at_once_get_what_each_would_alone():
    """A capture, a generation, a perplexity sweep and a replay, run through the functions the pages call,
    in threads at the same time: each gets exactly what it gets alone.

    Each job switches the shared model's attention implementation or hooks it (a capture records
    through its own attention function; the evaluator swaps in the grouped one), so without
    ``dashboard.model_lock`` one job's forward runs under another's attention.
    """


    prompt = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    jobs = {
        "capture": lambda: dashboard.capture_embedded("books", 32, 1).get(20, "value"),
        "generate": lambda: dashboard.generate_text(prompt, "weightedkv", 12, 4, None, 6, False, 1.0, 0)["kept"],
        "sweep": lambda: [r["ppl"] for r in
                          dashboard.sweep_embedded("books", 48, 24, ["weightedkv"], [12])[0]["results"]],
        "replay": lambda: [h.positions for h in
                           dashboard.replay_cached("default", list(range(100, 130)), "weightedkv", 12, 4,
                                                   20).steps[-1]],
    }
    alone = {name: job() for name, job in jobs.items()}
    dashboard._replays().clear()  # the replay is cached per process: make the concurrent round compute it again
    together, errors, guard = {}, [], threading.Lock()

    def run(name):
        try:
            result = jobs[name]()
            with guard:
                together.setdefault(name, []).append(result)
        except Exception as err:  # noqa: BLE001 - reported below with the job's name
            errors.append(f"{name}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=run, args=(name,)) for name in jobs for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert all(torch.equal(got, alone["capture"]) for got in together["capture"])
    assert together["generate"] == [alone["generate"]] * 2 and together["replay"] == [alone["replay"]] * 2
    assert all(got == pytest.approx(alone["sweep"], rel=1e-6) for got in together["sweep"])


def test_model_lock_is_one_reentrant_lock_per_model():


    with dashboard.model_lock():
        with dashboard.model_lock():  # a locked helper may call another
            got = []
            other = threading.Thread(target=lambda: got.append(dashboard._lock("default", "eager").acquire(timeout=0)))
            other.start()
            other.join()
            assert got == [False]  # held: another thread (session) has to wait
    assert dashboard._lock("default", "eager").acquire(timeout=0)
    dashboard._lock("default", "eager").release()


@pytest.mark.slow
def test_attention_page_on_the_starter(runs):
    """First open computes the starter capture; the replay runs the real cache; the slider steps through it."""
    at = app("pages/5_Attention.py").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="run").value.startswith("starter:")
    assert titles(at)[0] == "Attention map, layer 15, KV head 0 (mean over its query heads)"
    victim = int(titles(at)[1].split("removes ")[1].split()[0])
    assert f"WeightedKV would remove position **{victim}**" in at.markdown[0].value
    assert "A similarity merge (weightedkv_similar: the most cosine-similar post-RoPE key)" in at.markdown[0].value
    assert titles(at)[2] == "Slots held after token 63 (layer 15, KV head 0, budget 32)"
    strips = json.loads(at.get("plotly_chart")[2].proto.spec)["data"]
    held = {t["y"][0] for t in strips if t["name"] == "held"}
    assert held == {"weightedkv", "weightedkv_similar", "weightedkv_evict", "streaming_llm"}
    streaming = next(t for t in strips if t["name"] == "held" and t["y"][0] == "streaming_llm")["x"]
    assert streaming == [0, 1, 2, 3] + list(range(36, 64))  # sinks + the newest: StreamingLLM's window
    assert "weightedkv: what each slot's value mixes after token 63" in titles(at)[3]

    at.slider(key="step").set_value(40).run()
    at.selectbox(key="head").set_value(2).run()
    assert not at.exception and not at.error
    assert titles(at)[2] == "Slots held after token 40 (layer 15, KV head 2, budget 32)"
    assert "after token 40" in titles(at)[3]
    at.multiselect(key="methods").set_value(["streaming_llm"]).run()
    assert not at.exception and "Mixtures are not available" not in [i.value for i in at.info]


def test_starter_set_up_is_idempotent(tmp_path, monkeypatch):
    """`python -m analysis.app.starter` (run by set-up) does nothing, without loading a model, once the set exists."""

    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path))
    for _, folder, name, _ in starter.PARTS.values():
        folder = folder()
        folder.mkdir(parents=True)
        (folder / name).write_text("{}")
    monkeypatch.setattr(starter, "load_model", lambda *a, **k: pytest.fail("loaded a model"))  # the name it calls
    assert starter.main(["--quiet"]) == 0


def write_retrieval_result(root: Path, tiny_model) -> Path:
    """A retrieval result of the tiny llama (hand-made prompts), saved as the command saves one."""
    units = [Unit(Job.of(m, 16), tiny_prompt(t, d)) for m in ("full", "weightedkv") for t in range(2) for d in (0, 50)]
    records = run_units(tiny_model("llama"), units, "decode")
    trials = [dict(r, task="passkey", mode="decode", said="x y") for r in records]
    settings = {"task": "passkey", "mode": "decode", "lengths": [48], "depths": [0, 50], "budgets": [16],
                "methods": ["full", "weightedkv"], "trials": 2, "seed": 0, "sinks": 4, "recent": None,
                "protect_question": False}
    examples = [{"length": 48, "depth": d, "trial": 0, "answer": "x", "before": "a <b>", "needle": "NEEDLE",
                 "after": "c", "question": "q?"} for d in (0, 50)]
    result = {"settings": settings, "model": "tiny-llama", "rows": cells(trials, "passkey", "decode"),
              "by_fate": by_fate(trials), "trials": trials, "examples": examples}
    return save_retrieval(root / "retrieval", result, png=False)


def test_retrieval_page(runs, tiny_model):
    write_retrieval_result(runs, tiny_model)
    at = app("pages/7_Retrieval.py").run()
    assert not at.exception and not at.error
    assert at.selectbox(key="result").value == "retrieval"
    assert [t.split(" — ")[0] for t in titles(at)] == ["Retrieval accuracy by length and depth",
                                                        "Retrieval against budget",
                                                        "Where the fact went, answered right vs wrong"]
    pooled = at.dataframe[0].value
    assert list(pooled["method"]) == ["full", "weightedkv"] and list(pooled["correct"].str[-2:]) == ["/4", "/4"]
    answers = at.dataframe[2].value
    assert list(answers["method"]) == ["full", "weightedkv"] and list(answers["answered"]) == ["x y", "x y"]
    assert any("<mark><b>NEEDLE</b></mark>" in m.value and "a &lt;b&gt;" in m.value for m in at.markdown)
    at.selectbox(key="example").set_value(1).run()
    assert not at.exception and "depth 50%" in at.selectbox(key="example").format_func(1)


def test_runs_are_listed_from_the_repository_runs_folder_unless_kvlens_runs(monkeypatch, tmp_path):
    """The repository is the folder holding app.py, wherever the dashboard was started; the variable is read
    on every call, not frozen at import."""
    monkeypatch.delenv("KVLENS_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)  # not the current directory
    assert dashboard.repo_root() == REPO and dashboard.runs_root() == REPO / "runs"
    monkeypatch.setenv("KVLENS_RUNS", str(tmp_path / "elsewhere"))
    assert dashboard.runs_root() == tmp_path / "elsewhere"


def run_readme_perplexity(name: str) -> Path:
    """The README's perplexity command with tiny sizes, run from the repository root into its runs/."""
    command = [sys.executable, "-m", "experiments.perplexity", "--corpus", "books", "--tokens", "64", "--window", "32",
               "--budget", "16", "--methods", "full,weightedkv", "--no-png", "--quiet", "--out", f"runs/{name}"]
    env = {k: v for k, v in os.environ.items() if k != "KVLENS_RUNS"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return REPO / "runs" / name


@pytest.mark.slow
def test_a_run_written_by_a_readme_command_is_listed_without_kvlens_runs(monkeypatch, tmp_path):
    monkeypatch.delenv("KVLENS_RUNS", raising=False)
    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path / "starter"))
    name = f"test-readme-{uuid.uuid4().hex[:8]}"
    try:
        out = run_readme_perplexity(name)
        at = app("pages/3_Perplexity.py").run()
        assert not at.exception and not at.error
        assert name in at.selectbox(key="sweep").options
        at.selectbox(key="sweep").set_value(name).run()
        assert not at.exception and not at.error
        assert list(at.dataframe[0].value["method"]) == ["full", "weightedkv"]
        assert f"Runs are listed from `{REPO / 'runs'}`" in at.sidebar.caption[-1].value
        assert json.loads((out / "perplexity.json").read_text())["tokens"] == 64
    finally:
        shutil.rmtree(REPO / "runs" / name, ignore_errors=True)


def test_every_page_that_lists_runs_says_where_from(runs, monkeypatch):
    """The home page and every page with a run picker say, in the sidebar, which folder the runs come from."""
    monkeypatch.setattr(dashboard, "starter_dir", lambda part: st.stop())  # no starter set needed here
    for page in ["app.py"] + [f"pages/{p}.py" for p in ("1_Spectra", "3_Perplexity", "4_Perturbation", "5_Attention",
                                                         "6_Heads", "7_Retrieval")]:
        at = app(page).run()
        assert not at.exception, page
        assert f"Runs are listed from `{runs}` (set KVLENS_RUNS to change)." in [c.value for c in at.sidebar.caption]


CHILD_MAKER = """
import sys
from pathlib import Path

from analysis.app import background, starter
from tests.app.test_dashboard import gated_maker

make = gated_maker(Path(sys.argv[1]), Path(sys.argv[2]))
starter.PARTS["capture"] = starter.PARTS["capture"][:3] + (make,)
print(background.make_part("capture", lambda: "model"))
"""


def gated_maker(gate: Path, log: Path, source: Path | None = None):
    """A starter maker that logs each call, reports 40 %, waits for ``gate`` to exist, then writes the part
    (``source`` moved into place, or a bare meta.json)."""

    def make(loaded, on_progress):
        with log.open("a") as f:
            f.write(f"{os.getpid()} {loaded}\n")
        on_progress(0.4)
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        out = starter.capture_dir()
        if source is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, out)
        else:
            from analysis.io import atomic_dir

            with atomic_dir(out) as tmp:
                (tmp / "meta.json").write_text("{}")
        return out

    return make


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_starter_part_is_computed_once_by_two_processes_at_once(tmp_path, monkeypatch):
    """A worker process computes the part; a second maker here sees it running (its progress file), does not
    start it again, waits, and finds it on disk; the model is loaded by the one that computes."""
    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path / "starter"))
    gate, log = tmp_path / "gate", tmp_path / "makers.log"
    monkeypatch.setitem(starter.PARTS, "capture", starter.PARTS["capture"][:3] + (gated_maker(gate, log),))
    child = subprocess.Popen([sys.executable, "-c", CHILD_MAKER, str(gate), str(log)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: background.status("capture")["state"] == "running" and log.is_file()
                 or child.poll() is not None)
        assert background.status("capture") == {"state": "running", "fraction": 0.4}
        progress = json.loads(background.progress_path("capture").read_text())
        assert progress["state"] == "running" and progress["pid"] == child.pid
        assert background.busy() == ["capture"]
        assert background.make_part("capture", lambda: pytest.fail("loaded"), wait=False) is None  # held: no start
        loads, got = [], []
        second = threading.Thread(target=lambda: got.append(background.make_part("capture", lambda: loads.append(1))))
        second.start()
        time.sleep(1.0)
        assert second.is_alive() and not starter.is_made("capture")  # it waits for the first
        gate.touch()
        second.join(timeout=60)
        assert child.wait(timeout=60) == 0, child.stdout.read()
    finally:
        gate.touch()
        child.kill()
        child.wait()
    assert got == [starter.capture_dir()] and starter.is_made("capture") and loads == []
    assert log.read_text().splitlines() == [f"{child.pid} model"]  # computed once, in the child
    assert background.status("capture") == {"state": "done", "fraction": 1.0}
    assert json.loads(background.progress_path("capture").read_text())["state"] == "done"


WORKER = """
import os, sys
from pathlib import Path
from analysis.app import background, starter
from tests.app.test_dashboard import gated_maker
starter.PARTS["capture"] = starter.PARTS["capture"][:3] + (gated_maker(Path(sys.argv[1]), Path(sys.argv[2])),)
starter.load_model = lambda *args, **kwargs: "model"
sys.exit(background.main(["--parent", str(os.getppid())]))
"""


def test_the_worker_stops_when_the_server_that_started_it_exits(tmp_path, monkeypatch):
    """A stand-in server starts a worker (stuck in its part), then dies: the worker ends, leaving the part
    neither locked nor failed, so the next start computes it again."""
    monkeypatch.setenv("KVLENS_STARTER", str(tmp_path / "starter"))
    gate, log = tmp_path / "gate-never", tmp_path / "makers.log"
    server_code = ("import subprocess, sys, time; "
                   "subprocess.Popen([sys.executable, '-c', sys.argv[1]] + sys.argv[2:]); time.sleep(600)")
    server = subprocess.Popen([sys.executable, "-c", server_code, WORKER, str(gate), str(log)], cwd=REPO)
    try:
        wait_for(lambda: background.status("capture")["state"] == "running" and log.is_file())
        assert background.worker_running()
    finally:
        server.kill()
        server.wait()
    wait_for(lambda: not background.worker_running(), timeout=30)  # the worker noticed, and ended
    assert background.status("capture") == {"state": "idle", "fraction": 0.0}
    assert not starter.is_made("capture") and len(log.read_text().splitlines()) == 1


class FakeWorker:
    """Stands for the worker process start() launches: it holds the worker lock it is handed."""

    def __init__(self, command, pass_fds=(), **kwargs):
        self.command, self.fd, self.returncode = command, os.dup(pass_fds[0]), None

    def poll(self):
        return self.returncode

    def exit(self):
        os.close(self.fd)
        self.returncode = 0

    def terminate(self):
        if self.returncode is None:
            self.exit()

    def wait(self, timeout=None):
        return self.returncode

    kill = terminate


@pytest.fixture
def fake_workers(runs, monkeypatch):
    """The workers start() would launch, recorded instead; pages follow a part for no time, then offer Refresh."""
    started = []
    monkeypatch.setattr(background.subprocess, "Popen", lambda *a, **k: started.append(FakeWorker(*a, **k))
                        or started[-1])
    monkeypatch.setattr(background, "_LAST_START", [float("-inf")])
    monkeypatch.setattr(background, "RESTART_S", 0.0)
    monkeypatch.setattr(dashboard, "STARTER_WAIT_S", 0.0)
    yield started
    for worker in started:
        worker.terminate()


def test_reloads_and_second_sessions_do_not_start_the_worker_again(fake_workers):
    started = fake_workers
    at = app("app.py").run()  # no runs, no starter capture: the page starts the worker and shows the queue
    assert not at.exception and not at.error and len(started) == 1
    assert started[0].command[1:4] == ["-m", "analysis.app.background", "--lock-fd"]
    assert background.worker_running() and background.want_path("capture").is_file()
    assert at.progress[0].text.startswith("The background worker is starting") and at.progress[0].value == 0
    assert at.button(key="starter_refresh_capture")
    for _ in range(2):  # a reload, a second session, a Refresh: one worker still
        app("app.py").run()
    at.button(key="starter_refresh_capture").click().run()
    assert not at.exception and len(started) == 1 and not background.start()
    started[0].exit()  # the worker stopped before the part was done: the next page view starts another
    app("app.py").run()
    assert len(started) == 2
    started[1].exit()
    for _, folder, marker, _ in starter.PARTS.values():  # everything on disk: nothing is started
        folder().mkdir(parents=True, exist_ok=True)
        (folder() / marker).write_text("{}")
    assert not background.start() and len(started) == 2


def test_the_page_shows_its_part_progress_while_it_is_computed(fake_workers, tiny_capture, tmp_path):
    started = fake_workers
    source = tmp_path / "made-capture"
    shutil.move(tiny_capture, source)  # the runs folder is empty: the home page shows the starter capture
    gate, log = tmp_path / "gate", tmp_path / "makers.log"
    maker = threading.Thread(target=background.make_part, args=("capture", lambda: "model"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(starter.PARTS, "capture", starter.PARTS["capture"][:3] + (gated_maker(gate, log, source),))
        maker.start()  # someone (here: a thread) is computing the part
        try:
            wait_for(lambda: background.status("capture")["fraction"] == 0.4)
            at = app("app.py").run()
            assert not at.exception and not at.error and not at.metric
            bar = at.progress[0]
            assert bar.value == 40 and bar.text.startswith("Computing the starter capture in the background")
            assert bar.text.endswith("40%") and at.button(key="starter_refresh_capture")
            assert started == []  # the part is being computed: nothing to start
        finally:
            gate.touch()
            maker.join(timeout=60)
    at.button(key="starter_refresh_capture").click().run()
    assert not at.exception and not at.error and not at.progress
    assert {m.label: m.value for m in at.metric}["model"] == "tiny-llama"
    assert len(log.read_text().splitlines()) == 1


def test_a_failed_part_shows_its_error_and_try_again_restarts_it(fake_workers):
    started = fake_workers
    background.progress_path("capture").write_text(json.dumps({"state": "failed", "error": "UserError: no corpora"}))
    at = app("app.py").run()
    assert not at.exception and "failed: UserError: no corpora" in at.error[0].value and started == []
    at.button(key="starter_retry_capture").click().run()
    assert len(started) == 1 and "failed" not in json.dumps(background.read_progress("capture"))
    assert not at.error and at.progress[0].text.startswith("The background worker is starting")
