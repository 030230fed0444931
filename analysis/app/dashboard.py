"""Helpers shared by the dashboard pages (app.py, pages/*.py): cached model, model lock, runs, starter set."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from analysis.app import starter  # noqa: E402
from analysis.compress import PolicyOptions, make_policy
from analysis.errors import UserError  # noqa: E402
from analysis.jobs import Job, Plan
from analysis.models.loading import load_model
from analysis.runtime import generate
from analysis.runtime.replay import replay

os.environ.setdefault("HF_HUB_OFFLINE", "1")


ROOT = Path(__file__).resolve().parent


STARTER_LABEL = starter.LABEL


def runs_root() -> Path:
    """Where the pages look for runs: ``$KVLENS_RUNS``, else ``runs/`` in the repository."""
    return Path(os.environ.get("KVLENS_RUNS") or ROOT / "runs")


@st.cache_resource(show_spinner="Loading model…")
def cached_model(model: str = "default", attn: str = "eager"):
    """One copy of the model per Streamlit process, shared by every page and every session."""

    return load_model(model, attn_implementation=attn)


# Module state, not st.cache_resource: "Clear cache" in the app menu must not hand out a second lock
# while a job holds the first (the dashboard module is imported once per process).
_LOCKS: dict[tuple[str, str], threading.RLock] = {}


_LOCKS_GUARD = threading.Lock()


def _lock(model: str, attn: str) -> threading.RLock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault((model, attn), threading.RLock())


@contextmanager
def model_lock(model: str = "default", attn: str = "eager"):
    """Hold while running the shared model: one job at a time per process.

    A capture, a CompressedCache and the perplexity evaluator each switch the model's attention
    implementation (process-global state on the shared model) and hook its attention modules, so
    two sessions running at once would otherwise change each other's attention mid-forward.
    Re-entrant: a locked helper may call another.
    """
    with _lock(model, attn):
        yield


@contextmanager
def user_errors():
    """Show a UserError as an error box instead of a traceback."""
    try:
        yield
    except UserError as err:
        st.error(str(err))


@contextmanager
def progress(label: str):
    """A progress bar for the block (yields ``callback(fraction)``), removed when the work is done."""
    slot = st.empty()
    bar = slot.progress(0.0, text=label)
    yield lambda fraction: bar.progress(min(float(fraction), 1.0), text=f"{label} {fraction:.0%}")
    slot.empty()


def capture_embedded(corpus: str, tokens: int, sequences: int):
    """Capture ``sequences`` x ``tokens`` of ``corpus`` on the embedded model, with a progress bar."""
    with model_lock(), progress("capturing") as bar:
        return starter.capture(cached_model(), corpus, tokens, sequences, on_progress=bar)


def sweep_embedded(corpus: str, tokens: int, window: int, methods: list[str], budgets: list[int]) -> tuple[dict, dict]:
    """A perplexity sweep on the embedded model (one document of ``corpus``), with a progress bar."""
    with model_lock(), progress("perplexity") as bar:  # the evaluator switches the model's attention
        return starter.sweep(cached_model(), corpus, tokens, window, methods, budgets, on_progress=bar)


def retrieval_embedded(settings, docs=None) -> dict:
    """A retrieval grid on the embedded model, with a progress bar, under the model lock."""
    with model_lock(), progress("retrieval") as bar:  # the cache hooks the shared model and switches its attention
        return starter.retrieval(cached_model(), settings, docs, on_progress=bar)


FIRST_OPEN = {  # what the progress bar says while a page's first open computes its starter part
    "capture": "capturing 256 tokens of Austen",
    "sweep": "a small perplexity sweep on Austen",
    "fig2": "a Fig. 2 study on two sequences",
    "profile": "profiling the heads on 256 Austen tokens",
    "retrieval": "a small passkey grid",
}


def starter_dir(part: str) -> Path:
    """A starter part's directory (analysis/app/starter.py): read from disk, or computed here once (set-up
    normally has made it). Two first sessions at once: the second waits, then finds it on disk."""
    _, folder, _, make = starter.PARTS[part]
    if not starter.is_made(part):
        with model_lock(), progress(f"first open: {FIRST_OPEN[part]} (once per machine)") as bar:
            make(cached_model(), bar)
    return folder()


def pick_result(dirs: list[Path], key: str, starter_label: str, part: str) -> Path:
    """A selectbox over result directories, the starter part last; the chosen one's directory.

    The starter is computed (once per machine) only when it is the one chosen. The choice survives
    reruns in ``st.session_state[key]`` while it is still offered.
    """
    paths = {p.name: p for p in dirs} | {starter_label: None}
    names = list(paths)
    if st.session_state.get(key) not in names:
        st.session_state[key] = names[0]
    name = st.selectbox(key, names, key=key)
    return paths[name] or starter_dir(part)


def starter_capture() -> Path:
    return starter_dir("capture")


def generate_text(prompt: str, method: str, budget: int | None, sinks: int, recent: int | None, new: int,
                  sample: bool, temperature: float, seed: int, plan_json: str | None = None) -> dict:
    """``analysis.runtime.generate.generate_text`` on the shared embedded model, under the model lock; the page's
    choices become a ``Job`` here (a bad plan or split fails before the model is touched)."""
    plan = Plan.from_text(plan_json) if plan_json else None
    job = Job.of(method, budget, PolicyOptions(sinks, recent, seed), plan)
    loaded = cached_model()
    with model_lock():  # the cache hooks the shared model and switches its attention while open
        return generate.generate_text(loaded, prompt, job, new, sample, temperature, seed)


@st.cache_resource(show_spinner=False)
def _replays() -> dict:
    return {}


def replay_cached(model: str, token_ids: list[int], method: str, budget: int, sinks: int, layer: int):
    """``analysis.runtime.replay.replay`` on the shared model, kept per process (up to 48 replays), with a
    progress bar."""

    store = _replays()
    key = (model, tuple(token_ids), method, budget, sinks, layer)
    if key not in store:
        with model_lock(model):
            if key in store:  # another session made it while this one waited
                return store[key]
            with progress(f"replaying {method} token by token") as bar:
                policy = make_policy(method, budget, sinks=sinks)  # the page's choices, turned into a policy once
                store[key] = replay(cached_model(model).model, list(token_ids), policy, layer, on_progress=bar)
        while len(store) > 48:
            store.pop(next(iter(store)))
    return store[key]
