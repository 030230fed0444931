"""Where the toolkit keeps things that are not in git: the converted model and the corpora."""

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the user cache (``$KVLENS_CACHE`` or ``~/.cache/kvlens``)."""
    root = os.environ.get("KVLENS_CACHE") or Path.home() / ".cache" / "kvlens"
    return Path(root)


def model_cache_dir() -> Path:
    return cache_dir() / "models"


def corpora_dir() -> Path:
    return cache_dir() / "corpora"
