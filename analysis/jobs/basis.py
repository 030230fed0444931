"""Channel compression: a low-rank basis per (layer, KV head) and the rank a cache keeps (``LowRank``).

A basis file (a directory: ``basis.safetensors`` + ``basis.json``) holds, for each kind
(``key_pre_rope``, ``value``) and each (layer, KV head), the eigenvectors of the Gram matrix of
the calibration vectors, i.e. the right singular vectors of the (tokens x head_dim) matrix X, by
descending energy, with the cumulative energy of each rank. Which vectors are decomposed:

- keys **before RoPE**: RoPE rotates each position by its own angle, which spreads a low-rank
  subspace over every channel (the spectra: rank 8 of 64 pre-RoPE, 23 post-RoPE). For models with a
  key norm (Qwen3, Gemma 3, OLMo 2) it is the key *after* the norm and before RoPE, exactly the
  vector RoPE rotates (the capture's ``key_pre_rope``); the cache gets the same vector by rotating
  the post-RoPE key back (``analysis.runtime.channels``).
- keys are optionally **centred** (``center``: the calibration mean is subtracted and kept, and
  added back on reconstruction); values are **never** centred: merging methods (WeightedKV, CaM)
  take linear combinations of values, and only an uncentred projection commutes with every linear
  combination, so merging coefficients is exactly merging the projected values.

A ``LowRank`` names a basis and the rank kept per kind: a fixed r in 1..d for every head, or per
head the smallest r reaching an energy fraction in (0, 1] of the calibration vectors. Heads of
lower rank hold zero-padded columns (physical width = the largest rank); bytes are counted both
ways (``analysis.runtime.cache.CompressedCache.memory``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from analysis.errors import UserError

KINDS = ("key_pre_rope", "value")
TENSORS, META = "basis.safetensors", "basis.json"


def fingerprint(model) -> str:
    """A short hash of the first attention layer's parameters: tells two models of one shape apart."""
    first = next(m for m in model.modules() if type(m).__name__.endswith("Attention"))
    digest = hashlib.sha256()
    for name, p in sorted(first.named_parameters()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().flatten()[:4096].numpy().tobytes())
    return digest.hexdigest()[:16]


def model_shape(config) -> dict:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    return {"model_type": config.model_type, "num_layers": config.num_hidden_layers,
            "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads}


@dataclass
class Basis:
    """Per-kind eigenvectors ``vectors[kind]`` (L, H, D, D) (column i = i-th direction), ``mean[kind]``
    (L, H, D) (zeros when not centred), ``energy[kind]`` (L, H, D) cumulative energy of ranks 1..D.
    ``layers`` lists the model layers held (row l of each tensor is layer ``layers[l]``)."""

    vectors: dict[str, Tensor]
    mean: dict[str, Tensor]
    energy: dict[str, Tensor]
    layers: list[int]
    shape: dict  # model_shape(config)
    model: str = "?"
    fingerprint: str = ""
    center: bool = False  # keys only; values are never centred
    calibration: dict = field(default_factory=dict)  # source, tokens, documents [{id, sha256}]

    @property
    def head_dim(self) -> int:
        return int(self.shape["head_dim"])

    def row(self, layer: int) -> int | None:
        return self.layers.index(layer) if layer in self.layers else None

    def check(self, model) -> None:
        """Refuse a basis made for another model: shape first, then the parameters' fingerprint."""
        shape = model_shape(model.config)
        if shape != self.shape:
            diff = ", ".join(f"{k} {self.shape.get(k)} (model {v})" for k, v in shape.items() if self.shape.get(k) != v)
            raise UserError(f"the basis was made for another model ({self.model}): {diff}")
        if self.fingerprint and self.fingerprint != fingerprint(model):
            raise UserError(f"the basis was made for another model ({self.model}, same shape, other weights)")

    def ranks(self, kind: str, rank: int | None = None, energy: float | None = None) -> Tensor:
        """(L, H) int64 ranks kept: ``rank`` for every head, or the smallest reaching ``energy`` per head."""
        if kind not in self.vectors:
            raise UserError(f"the basis has no {kind!r} (it has {', '.join(self.vectors)})")
        check_rank(rank, energy, self.head_dim)
        cum = self.energy[kind]
        if rank is not None:
            return torch.full(cum.shape[:2], rank, dtype=torch.long)
        return ((cum < energy - 1e-12).sum(-1) + 1).clamp(max=self.head_dim)

    # --- files -----------------------------------------------------------------------------
    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"{kind}.{part}": getattr(self, part)[kind].float().contiguous()
                   for kind in self.vectors for part in ("vectors", "mean", "energy")}
        save_file(tensors, str(out / TENSORS))
        meta = {"format": "kvlens-lowrank-basis/1", "model": self.model, "fingerprint": self.fingerprint,
                "shape": self.shape, "layers": self.layers, "kinds": list(self.vectors), "center": self.center,
                "values_centred": False, "calibration": self.calibration}
        (out / META).write_text(json.dumps(meta, indent=1))
        return out

    @classmethod
    def load(cls, path: str | Path) -> "Basis":
        path = Path(path)
        if not (path / META).is_file() or not (path / TENSORS).is_file():
            raise UserError(f"{path} is not a basis directory (no {META} + {TENSORS}); "
                            "make one with python -m experiments.lowrank calibrate")
        try:
            meta = json.loads((path / META).read_text())
            tensors = load_file(str(path / TENSORS))
            kinds = meta["kinds"]
            parts = {p: {k: tensors[f"{k}.{p}"] for k in kinds} for p in ("vectors", "mean", "energy")}
            basis = cls(**parts, layers=[int(x) for x in meta["layers"]], shape=dict(meta["shape"]),
                        model=meta.get("model", "?"), fingerprint=meta.get("fingerprint", ""),
                        center=bool(meta.get("center", False)), calibration=meta.get("calibration", {}))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a valid basis file ({type(e).__name__}: {e})") from None
        D = basis.head_dim
        for kind, v in basis.vectors.items():
            if tuple(v.shape) != (len(basis.layers), basis.shape["num_kv_heads"], D, D):
                raise UserError(f"{path}: {kind} vectors have shape {tuple(v.shape)}, not "
                                f"({len(basis.layers)}, {basis.shape['num_kv_heads']}, {D}, {D}) as its JSON says")
        return basis


def check_rank(rank: int | None, energy: float | None, head_dim: int) -> None:
    if (rank is None) == (energy is None):
        raise UserError("give a rank or an energy, not both and not neither")
    if rank is not None and not (isinstance(rank, int) and 1 <= rank <= head_dim):
        raise UserError(f"rank {rank} is out of 1..{head_dim} (the head dimension)")
    if energy is not None and not (0.0 < energy <= 1.0):
        raise UserError(f"energy {energy} is outside (0, 1]")


def fit(grams: Tensor, sums: Tensor, count: int, center: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Eigenvectors (L, H, D, D), mean (L, H, D) and cumulative energy (L, H, D) from pooled statistics.

    grams (L, H, D, D) float64 sum of X^T X over every calibration sequence, sums (L, H, D) the sum of
    X over tokens, ``count`` tokens in all. Centred: the Gram of X - mean is G - count * mean mean^T.
    """
    mean = sums / count  # (L, H, D)
    if center:
        grams = grams - count * mean[..., :, None] * mean[..., None, :]
    else:
        mean = torch.zeros_like(mean)
    eigenvalues, vectors = torch.linalg.eigh(grams)  # ascending
    eigenvalues, vectors = eigenvalues.flip(-1).clamp_min(0), vectors.flip(-1)  # descending
    energy = eigenvalues.cumsum(-1) / eigenvalues.sum(-1, keepdim=True).clamp_min(1e-300)
    return vectors.float(), mean.float(), energy.float()


@dataclass(frozen=True, eq=False)
class LowRank:
    """What a cache keeps in low rank: keys (``key_rank`` or ``key_energy``) and/or values, from ``basis``."""

    basis: Basis
    key_rank: int | None = None
    key_energy: float | None = None
    value_rank: int | None = None
    value_energy: float | None = None

    def __post_init__(self) -> None:
        D = self.basis.head_dim
        if not (self.keys or self.values):
            raise UserError("low-rank: give a key rank/energy or a value rank/energy")
        if self.keys:
            check_rank(self.key_rank, self.key_energy, D)
        if self.values:
            check_rank(self.value_rank, self.value_energy, D)

    @classmethod
    def of(cls, basis: "Basis | str | Path | None", key_rank: int | None = None, key_energy: float | None = None,
           value_rank: int | None = None, value_energy: float | None = None) -> "LowRank | None":
        """From options; None when no basis is given (any rank then is an error)."""
        if basis is None:
            if any(x is not None for x in (key_rank, key_energy, value_rank, value_energy)):
                raise UserError("a key/value rank needs a basis (--key-basis DIR)")
            return None
        basis = basis if isinstance(basis, Basis) else Basis.load(basis)
        return cls(basis, key_rank, key_energy, value_rank, value_energy)

    @property
    def keys(self) -> bool:
        return self.key_rank is not None or self.key_energy is not None

    @property
    def values(self) -> bool:
        return self.value_rank is not None or self.value_energy is not None

    @property
    def tag(self) -> str:
        """Short label used in job keys: "k8", "k0.9", "k8v32"."""
        key = f"k{self.key_rank if self.key_rank is not None else self.key_energy}" if self.keys else ""
        value = f"v{self.value_rank if self.value_rank is not None else self.value_energy}" if self.values else ""
        return key + value

    def ranks(self, kind: str) -> Tensor | None:
        """(L, H) ranks of ``kind`` ("key_pre_rope" or "value"), None when that kind stays full."""
        if kind == "key_pre_rope":
            return self.basis.ranks(kind, self.key_rank, self.key_energy) if self.keys else None
        return self.basis.ranks(kind, self.value_rank, self.value_energy) if self.values else None

    def layer(self, kind: str, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """(vectors (H, D, R) with columns past each head's rank zeroed, mean (H, D), ranks (H,)) or None.

        R is the largest rank of the layer's heads; a layer the basis does not hold stays full.
        """
        ranks, row = self.ranks(kind), self.basis.row(layer)
        if ranks is None or row is None:
            return None
        r = ranks[row]  # (H,)
        R = int(r.max())
        vectors = self.basis.vectors[kind][row, :, :, :R].clone()  # (H, D, R)
        vectors *= (torch.arange(R)[None, :] < r[:, None]).to(vectors.dtype)[:, None, :]  # zero the padding
        return vectors, self.basis.mean[kind][row], r

    def describe(self) -> dict:
        out = {"basis_model": self.basis.model, "center": self.basis.center}
        for kind, name in (("key_pre_rope", "key"), ("value", "value")):
            ranks = self.ranks(kind)
            out[f"{name}_rank"] = None if ranks is None else round(float(ranks.float().mean()), 3)
        return out


def slot_bytes(head_dim: int, element_size: int, key_width: float | None = None,
               value_width: float | None = None) -> float:
    """Bytes one slot of one (layer, KV head) holds: (key width + value width) x element size.

    Full keys and values: 2 d x dtype; rank-r keys: (r + d) x dtype; per-head ranks: their mean.
    """
    return ((key_width if key_width is not None else head_dim)
            + (value_width if value_width is not None else head_dim)) * element_size


def slots_for_bytes(budget_bytes: float, per_slot: float, sinks: int = 4) -> int:
    """Slots per (layer, KV head) a byte budget buys (equal bytes): m = floor(B / per_slot).

    Refused when B does not buy the smallest cache a policy can run (sinks + 2 slots: the sinks, one
    victim candidate, one recent token).
    """
    slots = int(budget_bytes // per_slot)
    if slots < sinks + 2:
        raise UserError(f"a byte budget of {budget_bytes:g} B per (layer, KV head) holds {slots} slot(s) of "
                        f"{per_slot:g} B; the smallest cache holds {sinks + 2} slots ({(sinks + 2) * per_slot:g} B)")
    return slots


def cache_bytes(held: Tensor, head_dim: int, element_size: int, lowrank: LowRank | None = None) -> int:
    """Logical bytes of one sequence's cache holding ``held`` (L, H) slots per (layer, KV head)."""
    widths = torch.full(held.shape, 2 * head_dim, dtype=torch.long)  # (L, H) key + value width
    if lowrank is not None:
        for kind in KINDS:
            ranks = lowrank.ranks(kind)
            if ranks is not None:
                rows = [lowrank.basis.row(layer) for layer in range(held.shape[0])]
                for layer, row in enumerate(rows):
                    if row is not None:
                        widths[layer] += ranks[row] - head_dim
    return int((held.long() * widths).sum()) * element_size
