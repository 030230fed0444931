"""Helpers shared by the dashboard pages (app.py, pages/*.py): cached model, model lock, runs, starter set."""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import streamlit as st
import torch

from analysis.app import starter  # noqa: E402
from analysis.compress.plans import Plan
from analysis.errors import UserError  # noqa: E402
from analysis.models.loading import load_model
from analysis.runtime.cache import CompressedCache
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


def progress_callback(label: str):
    bar = st.progress(0.0, text=label)
    return lambda fraction: bar.progress(min(float(fraction), 1.0), text=f"{label} {fraction:.0%}")


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


FIRST_OPEN = {  # what the progress bar says while a page's first open computes its starter part
    "capture": "capturing 256 tokens of Austen",
    "sweep": "a small perplexity sweep on Austen",
    "fig2": "a Fig. 2 study on two sequences",
    "profile": "profiling the heads on 256 Austen tokens",
}


def starter_dir(part: str) -> Path:
    """A starter part's directory (analysis/starter.py): read from disk, or computed here once (set-up
    normally has made it). Two first sessions at once: the second waits, then finds it on disk."""
    _, folder, _, make = starter.PARTS[part]
    if not starter.is_made(part):
        with model_lock(), progress(f"first open: {FIRST_OPEN[part]} (once per machine)") as bar:
            make(cached_model(), bar)
    return folder()


def starter_capture() -> Path:
    return starter_dir("capture")


def generate_text(prompt: str, method: str, budget: int | None, sinks: int, recent: int | None, new: int,
                  sample: bool, temperature: float, seed: int, plan_json: str | None = None) -> dict:
    """Generate from ``prompt`` through a CompressedCache; the text and the cache afterwards, as plain data.

    ``plan_json``: a per-(layer, KV head) plan file's text (analysis/plans.py), replacing the budget.
    """



    loaded = cached_model()
    tok = loaded.tokenizer
    ids = torch.tensor([tok.encode(prompt)], device=loaded.device)
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty")
    plan = Plan.from_text(plan_json) if plan_json else None
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with model_lock():  # the cache hooks the shared model and switches its attention while open
        cache = CompressedCache(loaded.model, method, budget, sinks=sinks, recent=recent, seed=seed, plan=plan)
        torch.manual_seed(seed)
        began = time.perf_counter()
        with torch.inference_mode(), cache:
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                        max_new_tokens=new, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                        **kwargs)
    seconds = time.perf_counter() - began
    generated = out[0, ids.shape[1]:]
    return {
        "text": tok.decode(generated, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
        "new_tokens": len(generated), "seconds": seconds, "occupancy": cache.occupancy(),
        "seen": [layer.get_seq_length() for layer in cache.layers], "sinks": cache.policy.sinks,
        "recent": cache.policy.recent, "memory": cache.memory(),
        "kept": [[[p for p in head if p >= 0] for head in cache.kept_positions(i)[0].tolist()]
                 for i in range(len(cache.layers))],
    }


@st.cache_resource(show_spinner=False)
def _replays() -> dict:
    return {}


def replay_cached(model: str, token_ids: list[int], method: str, budget: int, sinks: int, layer: int):
    """``analysis.runtime.replay.replay`` on the shared model, kept per process (up to 48 replays) and shown with a progress bar."""

    store = _replays()
    key = (model, tuple(token_ids), method, budget, sinks, layer)
    if key not in store:
        with model_lock(model):
            if key in store:  # another session made it while this one waited
                return store[key]
            with progress(f"replaying {method} token by token") as bar:
                store[key] = replay(cached_model(model).model, list(token_ids), method, budget, layer, sinks=sinks,
                                    on_progress=bar)
        while len(store) > 48:
            store.pop(next(iter(store)))
    return store[key]
