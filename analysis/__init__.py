"""kvlens: what is inside an LLM's key/value cache, and what happens when you compress it.

The public API, importable from ``analysis`` directly::

    from analysis import load_model, CompressedCache, record, make_policy, METHODS, Plan

Layers, lowest first (``pyproject.toml`` holds the import-linter contracts that keep them one-way):
``errors``/``paths``, ``io``/``ops``, ``text``/``models``, ``compress`` (the policies, plans and
jobs), ``runtime`` (the attention kernel, ``CompressedCache``, capture, replay, generation), the
studies (``perplexity``, then ``perturbation``/``spectra``, then ``heads``), ``report`` (figures) and
``app`` (the dashboard's helpers). A module imports only from layers below its own.

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
