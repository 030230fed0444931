"""Helpers shared by the dashboard pages (app.py, pages/*.py): cached model, model lock, runs, starter set."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from analysis.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parent

# The starter set every page shows on first open, before the user has made a run of their own.
STARTER_CAPTURE = dict(corpus="books", tokens=256, maps_window=(192, 256))
STARTER_SWEEP = dict(corpus="books", tokens=256, window=128, budgets=[32],
                     methods=["full", "weightedkv", "weightedkv_evict", "streaming_llm"])
STARTER_LABEL = "starter: Austen, 256 tokens (embedded model)"


def runs_root() -> Path:
    """Where the pages look for runs: ``$KVLENS_RUNS``, else ``runs/`` in the repository."""
    return Path(os.environ.get("KVLENS_RUNS") or ROOT / "runs")


def starter_root() -> Path:
    """Where the starter set is cached: ``$KVLENS_STARTER``, else ``starter/`` in the kvlens cache."""
    from analysis.paths import cache_dir

    return Path(os.environ.get("KVLENS_STARTER") or cache_dir() / "starter")


@st.cache_resource(show_spinner="Loading model…")
def cached_model(model: str = "default", attn: str = "eager"):
    """One copy of the model per Streamlit process, shared by every page and every session."""
    from analysis.models import load_model

    return load_model(model, attn_implementation=attn)


@st.cache_resource(show_spinner=False)
def _lock(model: str, attn: str) -> threading.RLock:
    return threading.RLock()


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


def austen_or_corpus(corpus: str):
    """The corpus' documents; for ``books``, the Austen novels first (the text the paper's examples use)."""
    from analysis.corpora import load_documents

    docs = load_documents(corpus=corpus)
    return [d for d in docs if "/austen/" in d.id] + [d for d in docs if "/austen/" not in d.id]


def capture_embedded(corpus: str, tokens: int, sequences: int, maps_window: tuple[int, int] | None = None):
    """Capture ``sequences`` x ``tokens`` of ``corpus`` on the embedded model, with a progress bar."""
    from analysis.capture import capture_sequences
    from analysis.corpora import token_sequences

    with model_lock():
        loaded = cached_model()
        seqs = token_sequences(loaded.tokenizer, austen_or_corpus(corpus), int(tokens), int(sequences))
        capture = capture_sequences(loaded, seqs, progress=False, on_progress=progress_callback("capturing"),
                                    maps_window=maps_window)
    capture.meta["source"] = {"corpus": corpus}
    return capture


def starter_capture_dir() -> Path:
    return starter_root() / "capture-{corpus}-{tokens}-maps{maps_window[0]}".format(**STARTER_CAPTURE)


def starter_sweep_dir() -> Path:
    return starter_root() / "ppl-{corpus}-{tokens}-w{window}-m{budgets[0]}".format(**STARTER_SWEEP)


def starter_capture() -> Path:
    """The starter capture run (computed once, with a progress bar, then read from disk)."""
    from analysis.runs import save_run

    out = starter_capture_dir()
    with model_lock():  # two first sessions at once: the second waits, then finds it on disk
        if not (out / "meta.json").is_file():
            save_run(capture_embedded(**STARTER_CAPTURE, sequences=1), out, overwrite=True)
    return out


def sweep_embedded(corpus: str, tokens: int, window: int, methods: list[str], budgets: list[int],
                   label: str = "perplexity") -> tuple[dict, dict]:
    """A perplexity sweep on the embedded model (one document of ``corpus``), with a progress bar."""
    from analysis.corpora import token_sequences
    from analysis.perplexity import make_windows, run_sweep, sweep_jobs

    jobs = sweep_jobs(methods, budgets, window)  # bad settings fail before any work
    with model_lock():  # the evaluator switches the shared model's attention implementation
        loaded = cached_model()
        windows = make_windows(token_sequences(loaded.tokenizer, austen_or_corpus(corpus), tokens, 1), window)
        total, done = len(jobs) * len(windows.docs), [0]
        bar = progress_callback(label)

        def progress(n: int) -> None:
            done[0] += n
            bar(done[0] / total)

        return run_sweep(loaded, windows, methods, budgets, source={"corpus": corpus}, tokens=tokens, documents=1,
                         progress=progress)


def starter_sweep() -> Path:
    """The starter perplexity sweep (computed once, with a progress bar, then read from disk)."""
    from analysis.perplexity import save_sweep

    s, out = STARTER_SWEEP, starter_sweep_dir()
    with model_lock():  # two first sessions at once: the second waits, then finds it on disk
        if not (out / "perplexity.json").is_file():
            summary, tensors = sweep_embedded(s["corpus"], s["tokens"], s["window"], s["methods"], s["budgets"],
                                              "first open: a small perplexity sweep on Austen (once per machine)")
            save_sweep(out, summary, tensors, overwrite=True, png=False)
    return out


def generate_text(prompt: str, method: str, budget: int | None, sinks: int, recent: int | None, new: int,
                  sample: bool, temperature: float, seed: int) -> dict:
    """Generate from ``prompt`` through a CompressedCache; the text and the cache afterwards, as plain data."""
    import time

    import torch

    from analysis.cache import CompressedCache

    loaded = cached_model()
    tok = loaded.tokenizer
    ids = torch.tensor([tok.encode(prompt)], device=loaded.device)
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty")
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    with model_lock():  # the cache hooks and may switch the shared model's attention
        cache = CompressedCache(loaded.model, method, budget, sinks=sinks, recent=recent, seed=seed)
        torch.manual_seed(seed)
        began = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                        max_new_tokens=new, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                        **kwargs)
    seconds = time.perf_counter() - began
    generated = out[0, ids.shape[1]:]
    return {
        "text": tok.decode(generated, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
        "new_tokens": len(generated), "seconds": seconds, "occupancy": cache.occupancy(),
        "seen": [layer.seen for layer in cache.layers], "sinks": cache.policy.sinks, "recent": cache.policy.recent,
        # -1 marks a free slot in the v2 cache core
        "kept": [[[p for p in head if p >= 0] for head in cache.kept_positions(i)[0].tolist()]
                 for i in range(len(cache.layers))],
    }


@st.cache_resource(show_spinner=False)
def _replays() -> dict:
    return {}


def replay_cached(model: str, token_ids: list[int], method: str, budget: int, sinks: int, layer: int):
    """``analysis.replay.replay`` on the shared model, kept per process (up to 48 replays) and shown with a progress bar."""
    from analysis.replay import replay

    store = _replays()
    key = (model, tuple(token_ids), method, budget, sinks, layer)
    if key not in store:
        with model_lock(model):
            if key in store:  # another session made it while this one waited
                return store[key]
            loaded = cached_model(model)
            bar = progress_callback(f"replaying {method} token by token")
            store[key] = replay(loaded.model, list(token_ids), method, budget, layer, sinks=sinks, on_progress=bar)
        while len(store) > 48:
            store.pop(next(iter(store)))
    return store[key]
