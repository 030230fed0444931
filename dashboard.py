"""Helpers shared by the dashboard pages (app.py, pages/*.py): cached model, runs folder, errors."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import streamlit as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from analysis.errors import UserError  # noqa: E402

RUNS = Path(os.environ.get("KVLENS_RUNS", "runs"))


@st.cache_resource(show_spinner="Loading model…")
def cached_model(model: str = "default", attn: str = "eager"):
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
