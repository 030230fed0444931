"""Helpers shared by the dashboard pages (app.py, pages/*.py): cached model, runs folder, errors."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from analysis.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parent


def runs_root() -> Path:
    """Where the pages look for runs: ``$KVLENS_RUNS``, else ``runs/`` in the repository."""
    return Path(os.environ.get("KVLENS_RUNS") or ROOT / "runs")


@st.cache_resource(show_spinner="Loading model…")
def cached_model(model: str = "default", attn: str = "eager"):
    """One copy of the model per Streamlit process, shared by every page."""
    from analysis.models import load_model

    return load_model(model, attn_implementation=attn)


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


def capture_embedded(corpus: str, tokens: int, sequences: int):
    """Capture ``sequences`` x ``tokens`` of ``corpus`` on the embedded model, with a progress bar."""
    from analysis.capture import capture_sequences
    from analysis.corpora import load_documents, token_sequences

    loaded = cached_model()
    seqs = token_sequences(loaded.tokenizer, load_documents(corpus=corpus), int(tokens), int(sequences))
    capture = capture_sequences(loaded, seqs, progress=False, on_progress=progress_callback("capturing"))
    capture.meta["source"] = {"corpus": corpus}
    return capture
