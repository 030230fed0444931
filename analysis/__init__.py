"""kvlens: what is inside an LLM's key/value cache, and what happens when you compress it.

The public API, importable from ``analysis`` directly::

    from analysis import load_model, CompressedCache, record, make_policy, METHODS, Plan

Layers, lowest first (``pyproject.toml`` holds the import-linter contracts that keep them one-way;
``|`` separates siblings that never import each other):

- ``errors`` | ``paths``: ``UserError`` and where things are kept;
- ``io`` | ``ops`` | ``options`` | ``stats``: atomic writes, the shared maths, option parsing, statistics;
- ``models`` | ``text``: loading any HF causal LM and its attention layouts; the Debian corpora;
- ``compress``: ``LayerState``, the ``Policy`` contract, one file per method, the registry and ``make_policy``;
- ``jobs``: a configured run (``Job``), per-head ``Plan``s, the low-rank ``Basis``;
- ``runtime``: the attention kernel, ``CompressedCache``, the decode engine (``decode``, ``batching``),
  capture, replay, generation;
- ``perplexity`` | ``perturbation`` | ``spectra`` | ``retrieval``: the studies;
- ``heads`` | ``lowrank`` | ``merges``: the studies built on those;
- ``report``: plotly figure builders and result writers;
- ``app`` | ``figures``: the dashboard's helpers and the starter set; the figure pipeline.

A module imports only from layers below its own.

The names below load on first use (PEP 562), so ``import analysis.text.corpora`` — set-up's corpus
fetch, for one — does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "load_model": "analysis.models.loading",
    "LoadedModel": "analysis.models.loading",
    "record": "analysis.runtime.capture",
    "capture_sequences": "analysis.runtime.capture",
    "Capture": "analysis.runtime.capture",
    "CompressedCache": "analysis.runtime.cache",
    "Plan": "analysis.jobs",
    "METHODS": "analysis.compress",
    "make_policy": "analysis.compress",
    "method_names": "analysis.compress",
    "Job": "analysis.jobs",
    "make_jobs": "analysis.jobs",
    "PolicyOptions": "analysis.compress",
    "Policy": "analysis.compress",
    "LayerState": "analysis.compress",
    "UserError": "analysis.errors",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'analysis' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return __all__
