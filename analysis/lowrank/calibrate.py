"""A low-rank basis from calibration text, through the capture and the spectra's Gram matrices.

The basis pools every calibration sequence: per (layer, KV head) the Gram matrix sum_b X_b^T X_b of
the captured pre-RoPE keys (and values), computed by ``analysis.spectra.compute.gram`` (float64), and its
eigenvectors (``analysis.jobs.basis.fit``). With one sequence and no centring, 1 - energy(r)
is exactly the relative reconstruction error ||X - X V_r V_r^T||^2 / ||X||^2, the quantity the spectra
module's cumulative energy reports.

Held-out evaluation: the basis records each calibration document's id and a SHA-256 of its text;
``check_disjoint`` refuses evaluation documents that share either, and ``held_out`` drops them.
"""

from __future__ import annotations

import hashlib

import torch

from analysis.errors import UserError
from analysis.jobs.basis import KINDS, Basis, fingerprint, fit, model_shape
from analysis.models.loading import LoadedModel
from analysis.runtime.capture import capture_sequences
from analysis.spectra.compute import gram
from analysis.text.corpora import token_sequences


def text_hash(text: str) -> str:
    """SHA-256 of the text with its whitespace runs made single spaces (a copy reformatted still matches)."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _base(doc_id: str) -> str:
    return doc_id.split("#")[0]  # "books/x#2" is the second chunk of "books/x"


def basis_from_capture(capture, model, center: bool = False, calibration: dict | None = None) -> Basis:
    """Fit a ``Basis`` of every captured layer from ``capture``'s ``key_pre_rope`` and ``value`` (B, H, T, D)."""
    missing = [k for k in KINDS if k not in capture.kinds]
    if missing:
        raise UserError(f"the capture has no {', '.join(missing)}: capture it with kinds {','.join(KINDS)}")
    layers = capture.layers
    parts = {"vectors": {}, "mean": {}, "energy": {}}
    for kind in KINDS:
        x = [capture.get(layer, kind) for layer in layers]  # each (B, H, T, D)
        grams = torch.stack([gram(t).sum(0) for t in x])  # (L, H, D, D) float64, pooled over sequences
        sums = torch.stack([t.double().sum((0, 2)) for t in x])  # (L, H, D)
        count = x[0].shape[0] * x[0].shape[2]
        vectors, mean, energy = fit(grams, sums, count, center and kind == "key_pre_rope")
        parts["vectors"][kind], parts["mean"][kind], parts["energy"][kind] = vectors, mean, energy
    return Basis(**parts, layers=list(layers), shape=model_shape(model.config),
                 model=str(capture.meta.get("model", "?")), fingerprint=fingerprint(model), center=center,
                 calibration=calibration or {})


def calibrate(loaded: LoadedModel, docs, source: dict, tokens: int, documents: int, center: bool = False,
              progress: bool = True) -> Basis:
    """Capture ``documents`` x ``tokens`` of ``docs`` with ``loaded`` and fit the basis."""
    head_dim = loaded.summary()["head_dim"]
    if tokens * documents < head_dim:
        raise UserError(f"{documents} x {tokens} tokens is fewer than head_dim={head_dim}: the basis is undetermined")
    sequences = token_sequences(loaded.tokenizer, docs, tokens, documents)
    capture = capture_sequences(loaded, sequences, kinds=KINDS, progress=progress)
    texts = {d.id: d.text for d in docs}
    used = list(dict.fromkeys(_base(i) for i, _ in sequences))
    calibration = {"source": source, "tokens": tokens, "sequences": [i for i, _ in sequences],
                   "documents": [{"id": i, "sha256": text_hash(texts[i])} for i in used]}
    return basis_from_capture(capture, loaded.model, center, calibration)


def check_disjoint(basis: Basis, docs) -> None:
    """Refuse evaluation documents the basis was calibrated on (same id, or same text under another name)."""
    seen = basis.calibration.get("documents", [])
    ids, hashes = {d["id"] for d in seen}, {d["sha256"] for d in seen}
    overlap = [d.id for d in docs if _base(d.id) in ids or text_hash(d.text) in hashes]
    if overlap:
        raise UserError(f"evaluation documents overlap the basis's calibration documents: {', '.join(overlap[:3])}"
                        + (f" and {len(overlap) - 3} more" if len(overlap) > 3 else "")
                        + "; evaluate on other documents (or calibrate on another corpus)")


def held_out(basis: Basis, docs) -> list:
    """``docs`` without the basis's calibration documents."""
    seen = basis.calibration.get("documents", [])
    ids, hashes = {d["id"] for d in seen}, {d["sha256"] for d in seen}
    return [d for d in docs if d.id not in ids and text_hash(d.text) not in hashes]
