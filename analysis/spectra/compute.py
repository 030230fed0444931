"""Singular-value spectra of captured keys, values and queries, per (layer, head).

For every sequence b, layer l, head h and kind, the T x d matrix X (tokens x head_dim) is
decomposed through its float64 Gram matrix X^T X (one batched matmul per layer, then one batched
``torch.linalg.eigvalsh`` per kind over all layers x heads x sequences; see ``singular_values``).
Optionally X is mean-centred over tokens first (``center=True``), which removes the rank-1
contribution of a constant offset shared by all tokens. Everything runs in float64 on the
tensors' device; singular values that are exactly zero come out near 1e-8 of sigma_1.

Normalisations (what each number and figure uses):

- ``singular_values``: sigma_i / sigma_1 of each sequence, then mean (and population std,
  ``singular_values_std``) across sequences. Figures of spectra plot this (log y).
- cumulative energy: sum_{j<=k} sigma_j^2 / sum_j sigma_j^2 (float64), per sequence.
- ``rank_90`` / ``rank_99``: smallest k with cumulative energy >= 0.90 / 0.99, computed on the
  mean normalised spectrum (an int); ``rank_90_mean`` / ``rank_99_mean`` are the per-sequence
  ranks averaged over sequences (a float). Summaries and heatmaps use the float means.
- ``effective_rank``: exp(entropy of p_i = sigma_i / sum_j sigma_j) (Roy & Vetterli, 2007), per
  sequence, averaged over sequences. Scale-free, in [1, d].
- ``keys_lower_rank_than_values``: share of (layer, KV head) pairs whose key ``rank_90_mean`` is
  strictly below the value ``rank_90_mean`` of the same pair.

Sliding-window layers (Gemma 2/3) are included like any other: spectra describe the keys and
values the capture recorded (all T tokens, rotated with the layer's own RoPE base), not what a
sliding cache holds at one time; nothing here compresses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from analysis.errors import UserError

DEFAULT_KINDS = ("key_pre_rope", "key_post_rope", "value", "query_post_rope")
NORMALISATION = (
    "singular values divided by the largest (sigma_i/sigma_1) per sequence, then mean and std across "
    "sequences; energy = sigma^2; ranks = smallest k with cumulative energy >= 0.90/0.99; effective "
    "rank = exp(entropy of sigma_i/sum(sigma)) (Roy & Vetterli)"
)
KV_KINDS = ("key_pre_rope", "key_post_rope", "value")


@dataclass
class HeadSpectrum:
    layer: int
    head: int
    kind: str
    singular_values: list[float]  # mean sigma_i/sigma_1 across sequences
    singular_values_std: list[float]
    cumulative_energy: list[float]  # mean across sequences
    effective_rank: float
    rank_90: int  # of the mean normalised spectrum
    rank_99: int
    rank_90_mean: float  # per-sequence ranks averaged over sequences
    rank_99_mean: float


@dataclass
class SpectraResult:
    model: str
    tokens: int
    sequences: int
    center: bool
    head_dim: int
    layers: list[int]
    kinds: list[str]
    heads: list[HeadSpectrum] = field(default_factory=list)

    def select(self, kind: str, layer: int | None = None, head: int | None = None) -> list[HeadSpectrum]:
        """Rows of one kind, optionally restricted to one layer and/or one head."""
        if kind not in self.kinds:
            raise UserError(f"kind {kind!r} is not in this result (has {', '.join(self.kinds)})")
        rows = [r for r in self.heads if r.kind == kind
                and (layer is None or r.layer == layer) and (head is None or r.head == head)]
        if not rows:
            raise UserError(f"no {kind} spectrum for layer={layer} head={head} in this result")
        return rows

    def num_heads(self, kind: str) -> int:
        return 1 + max(r.head for r in self.heads if r.kind == kind)

    def matrix(self, kind: str, metric: str) -> list[list[float]]:
        """``metric`` of ``kind`` as a layers x heads grid (rows follow ``self.layers``)."""
        grid = [[float("nan")] * self.num_heads(kind) for _ in self.layers]
        row_of = {layer: i for i, layer in enumerate(self.layers)}
        for r in self.select(kind):
            grid[row_of[r.layer]][r.head] = float(getattr(r, metric))
        return grid

    def summary(self) -> dict:
        out: dict = {}
        for kind in self.kinds:
            rows = self.select(kind)
            out[kind] = {
                "mean_rank_90": _mean([r.rank_90_mean for r in rows]),
                "mean_rank_99": _mean([r.rank_99_mean for r in rows]),
                "mean_effective_rank": _mean([r.effective_rank for r in rows]),
                "pairs": len(rows),
            }
        lower = {}
        if "value" in self.kinds:
            values = {(r.layer, r.head): r.rank_90_mean for r in self.select("value")}
            for kind in ("key_pre_rope", "key_post_rope"):
                if kind in self.kinds:
                    keys = self.select(kind)
                    lower[kind] = _mean([float(r.rank_90_mean < values[(r.layer, r.head)]) for r in keys])
        out["keys_lower_rank_than_values"] = lower
        return out

    def to_json(self) -> dict:
        return {
            "model": self.model, "tokens": self.tokens, "sequences": self.sequences,
            "center": self.center, "normalisation": NORMALISATION, "head_dim": self.head_dim,
            "layers": list(self.layers), "kinds": list(self.kinds),
            "heads": [asdict(r) for r in self.heads], "summary": self.summary(),
        }

    @classmethod
    def from_json(cls, d: dict) -> "SpectraResult":
        try:
            heads = [HeadSpectrum(**r) for r in d["heads"]]
            return cls(model=d["model"], tokens=int(d["tokens"]), sequences=int(d["sequences"]),
                       center=bool(d["center"]), head_dim=int(d["head_dim"]), layers=list(d["layers"]),
                       kinds=list(d["kinds"]), heads=heads)
        except (KeyError, TypeError) as e:
            raise UserError(f"not a spectra result (spectra.json): missing or bad field {e}") from None


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _rank_at(cum: torch.Tensor, threshold: float) -> torch.Tensor:
    """Smallest k (1-based) with cum[..., k-1] >= threshold. cum: (..., D) -> (...)"""
    return (cum < threshold - 1e-12).sum(-1).clamp(max=cum.shape[-1] - 1) + 1


def spectrum_metrics(s: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of singular values s: (..., B, D), descending, B = sequences. Reduces over B."""
    s = s.to(torch.float64)
    norm = s / s[..., :1].clamp_min(torch.finfo(torch.float64).tiny)  # (..., B, D)
    energy = s.square()
    cum = energy.cumsum(-1) / energy.sum(-1, keepdim=True).clamp_min(1e-300)  # (..., B, D)
    p = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)  # (..., B)
    mean_norm = norm.mean(-2)  # (..., D)
    mean_energy = mean_norm.square()
    mean_cum = mean_energy.cumsum(-1) / mean_energy.sum(-1, keepdim=True).clamp_min(1e-300)
    return {
        "singular_values": mean_norm,
        "singular_values_std": norm.std(-2, correction=0),
        "cumulative_energy": cum.mean(-2),
        "effective_rank": entropy.exp().mean(-1),
        "rank_90": _rank_at(mean_cum, 0.90),
        "rank_99": _rank_at(mean_cum, 0.99),
        "rank_90_mean": _rank_at(cum, 0.90).to(torch.float64).mean(-1),
        "rank_99_mean": _rank_at(cum, 0.99).to(torch.float64).mean(-1),
    }


def _check(capture, kinds, layers) -> list[int]:
    for kind in kinds:
        if kind not in capture.kinds:
            raise UserError(f"kind {kind!r} is not in the capture (captured: {', '.join(capture.kinds)})")
    if layers is None:
        return list(capture.layers)
    for layer in layers:
        if layer not in capture.layers:
            n = capture.meta.get("config", {}).get("num_layers")
            where = f"the model has {n} layers (0-{n - 1})" if n else "out of range"
            raise UserError(f"layer {layer} is not in the capture (captured layers {_ranges(capture.layers)}; {where})")
    return list(layers)


def _ranges(xs: list[int]) -> str:
    xs = sorted(xs)
    return f"{xs[0]}-{xs[-1]}" if xs and xs == list(range(xs[0], xs[-1] + 1)) else ",".join(map(str, xs))


def gram(x: torch.Tensor, center: bool = False) -> torch.Tensor:
    """(..., T, D) -> (..., D, D) float64 X^T X, of the token-centred X when ``center``."""
    x = x.double()
    if center:
        x = x - x.mean(-2, keepdim=True)  # remove each sequence's token mean, per dimension
    return x.transpose(-1, -2) @ x


def singular_values(grams: torch.Tensor) -> torch.Tensor:
    """Singular values (..., D), descending, from Gram matrices (..., D, D).

    sigma_i = sqrt(eigenvalue_i of X^T X). The Gram matrix is D x D however long T is, so one
    batched matmul per layer and one batched symmetric eigensolve replace T x D SVDs (much faster
    on CPU, where batched ``svdvals`` runs matrix by matrix). In float64 the squared condition
    number costs nothing the metrics can see: sigma_i / sigma_1 stays exact to ~1e-8.
    """
    return torch.linalg.eigvalsh(grams).clamp_min(0).sqrt().flip(-1)


def compute_spectra(capture, kinds=DEFAULT_KINDS, layers=None, center: bool = False) -> SpectraResult:
    """Spectra of every (layer, head, kind) of ``capture``; see the module docstring for the metrics."""
    kinds = list(kinds)
    if not kinds:
        raise UserError("no kinds to analyse")
    layers = _check(capture, kinds, layers)
    if not layers:
        raise UserError("no layers to analyse")
    rows: list[HeadSpectrum] = []
    shape = None
    for kind in kinds:
        B, H, T, D = capture.get(layers[0], kind).shape
        shape = (B, T, D)
        if T < D:
            raise UserError(f"rank is bounded by T={T}, fewer tokens than head_dim={D}; use --tokens >= {D}")
        grams = torch.stack([gram(capture.get(layer, kind), center) for layer in layers])  # (L, B, H, D, D)
        s = singular_values(grams.transpose(1, 2))  # (L, H, B, D), one batched eigensolve
        m = {k: v.cpu().tolist() for k, v in spectrum_metrics(s).items()}  # each (L, H, ...)
        for i, layer in enumerate(layers):
            for h in range(H):
                rows.append(HeadSpectrum(layer=int(layer), head=h, kind=kind,
                                         **{k: v[i][h] for k, v in m.items()}))
    B, T, D = shape
    return SpectraResult(model=str(capture.meta.get("model", "?")), tokens=T, sequences=B, center=center,
                         head_dim=D, layers=[int(l) for l in layers], kinds=kinds, heads=rows)


LABELS = {"key_pre_rope": "pre-RoPE keys", "key_post_rope": "post-RoPE keys",
          "value": "values", "query_post_rope": "post-RoPE queries"}


def summary_sentence(result: SpectraResult) -> str:
    """The headline numbers in words, e.g. "Pre-RoPE keys need 7.6 of 64 dimensions for 90% energy..."."""
    s = result.summary()
    ranks = [f"{LABELS.get(k, k)} {s[k]['mean_rank_90']:.1f}" for k in result.kinds]
    rest = ranks[1:]
    name0 = LABELS.get(result.kinds[0], result.kinds[0])
    text = (f"{name0[0].upper()}{name0[1:]} need {s[result.kinds[0]]['mean_rank_90']:.1f} of {result.head_dim} "
            f"dimensions for 90% energy on average" + "".join(f", {r}" for r in rest)
            + f" ({result.sequences} sequence(s) of {result.tokens} tokens, {len(result.layers)} layer(s), "
            + ("mean-centred, " if result.center else "") + "mean over (layer, head) pairs).")
    lower = s["keys_lower_rank_than_values"]
    if lower:
        shares = [f"{LABELS[k]} in {100 * v:.0f}%" for k, v in lower.items()]
        text += (" Keys are lower-rank than values: " + ", ".join(shares)
                 + f" of {s['value']['pairs']} (layer, KV head) pairs.")
    return text
