"""Helpers shared by the dashboard pages (app.py, pages/*.py): cached model, model lock, runs, starter set."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from analysis.app import background, starter
from analysis.compress import PolicyOptions, make_policy
from analysis.errors import UserError
from analysis.jobs import Job, Plan
from analysis.models.loading import load_model
from analysis.runtime import generate
from analysis.runtime.replay import replay

STARTER_LABEL = starter.LABEL


def repo_root() -> Path:
    """The repository: the nearest folder above this file that holds ``app.py`` and ``pages/``.

    kvlens is installed editable (``./run.sh``), so this file is imported from the repository itself,
    whatever the current directory; a copy installed elsewhere falls back to the current directory.
    """
    for folder in Path(__file__).resolve().parents:
        if (folder / "app.py").is_file() and (folder / "pages").is_dir():
            return folder
    return Path.cwd()


def runs_root() -> Path:
    """Where the pages look for runs: ``$KVLENS_RUNS``, else the repository's ``runs/`` (where the README's
    commands write, run from the repository root). Read on every call, never frozen at import."""
    return Path(os.environ.get("KVLENS_RUNS") or repo_root() / "runs").expanduser()


def show_runs_root() -> Path:
    """``runs_root()``, said in the sidebar of the page that lists runs from it."""
    root = runs_root()
    st.sidebar.caption(f"Runs are listed from `{root}` (set KVLENS_RUNS to change).")
    return root


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


STARTER_WAIT_S = 600.0  # how long one run of a page follows its starter part before offering Refresh
POLL_S = 1.0


def _waiting(part: str, state: dict) -> str:
    name = starter.PARTS[part][0]
    if state["state"] == "running":
        return f"Computing the {name} in the background ({FIRST_OPEN[part]}, once per machine): {state['fraction']:.0%}"
    others = [f"the {starter.PARTS[p][0]} ({background.status(p)['fraction']:.0%})" for p in background.busy()]
    if state["state"] == "queued" and others:
        return f"In the background queue: {', '.join(others)} first, then the {name}."
    if state["state"] == "queued":
        return f"The background worker is starting (loading the model); the {name} is next."
    return f"Starting the background computation of the starter set (the {name} first)…"


def starter_dir(part: str) -> Path:
    """A starter part's directory (analysis/app/starter.py), once it is on disk.

    A missing part is computed by the background worker (analysis/app/background.py, started here
    if none runs), never by the page: the page shows the part's progress, read from the worker's
    progress file, and goes on when it is done (after ``STARTER_WAIT_S``: a Refresh button). Any
    number of sessions and reloads wait on the same single computation.
    """
    folder = starter.PARTS[part][1]
    if starter.is_made(part):
        return folder()
    background.want(part)
    slot = st.empty()
    deadline = time.monotonic() + STARTER_WAIT_S
    while (state := background.status(part))["state"] != "failed":
        if state["state"] == "done":
            slot.empty()
            return folder()
        if state["state"] == "idle" and background.start():
            state = background.status(part)
        slot.progress(state["fraction"], text=_waiting(part, state))
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    with slot.container():
        if state["state"] == "failed":
            st.error(f"Computing the {starter.PARTS[part][0]} failed: {state['error']} "
                     f"(log: {background.log_path()}).")
            st.button("Try again", key=f"starter_retry_{part}", on_click=background.start, kwargs={"retry": part})
        else:
            st.progress(state["fraction"], text=_waiting(part, state))
            st.button("Refresh", key=f"starter_refresh_{part}", help="The starter set is still being computed "
                      "in the background; this page shows it once it is done.")
    st.stop()


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
