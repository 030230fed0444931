"""Capture a text source: cut the documents into sequences, capture them, record where they came from.

What ``python -m experiments.capture`` and the dashboard's starter capture (and the home page's
"capture on the embedded model") both do, so a run records its text the same way from either.
"""

from __future__ import annotations

from analysis.models.loading import LoadedModel
from analysis.runtime.capture import capture_sequences
from analysis.text.corpora import token_sequences


def capture_documents(loaded: LoadedModel, docs, source: dict, tokens: int, sequences: int = 1, **capture_kwargs):
    """``sequences`` x ``tokens`` of ``docs`` captured with ``loaded``; ``source`` (e.g. {"corpus": "books"})
    goes into the run's meta. ``capture_kwargs``: ``analysis.runtime.capture.capture_sequences`` options."""
    seqs = token_sequences(loaded.tokenizer, docs, int(tokens), int(sequences))
    result = capture_sequences(loaded, seqs, **capture_kwargs)
    result.meta["source"] = source
    return result
