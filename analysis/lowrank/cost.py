"""What rank r costs each head: attention-output error of rank-r keys, next to the head's key rank (spectra).

On captured held-out sequences, per (layer, KV head) and rank r, the head's causal attention is run
twice through the one kernel (``analysis.runtime.kernel.slot_attention``): with the captured
post-RoPE keys, and with the keys the low-rank cache would hold (pre-RoPE key projected on the
basis's top-r directions, plus the mean, rotated to its position by the model's RoPE). The error is
the relative output error sqrt(sum ||o_r - o||^2 / sum ||o||^2), sums over queries, the query heads
of the group and the sequences (a per-query ratio would be dominated by queries that attend to a sink
whose value is near zero, so that ||o|| is tiny). Every other layer's input is the full model's (one head at a time),
so this isolates the head, as the perturbation study's one-step measures do.

Next to it: the head's pre-RoPE key rank at 90 % energy on the same text (``analysis.spectra``) and
the calibration energy of rank r. The spectra's prediction is that heads of low key rank lose little.
"""

from __future__ import annotations

import torch

from analysis.errors import UserError
from analysis.jobs.basis import Basis
from analysis.models.loading import attention_modules
from analysis.runtime.capture import Capture
from analysis.runtime.channels import Rotary
from analysis.runtime.kernel import slot_attention
from analysis.spectra.compute import compute_spectra

KINDS = ("query_post_rope", "key_pre_rope", "key_post_rope", "value")


def rank_costs(model, capture: Capture, basis: Basis, ranks: list[int]) -> list[dict]:
    """Rows {layer, kv_head, rank, output_error, calibration_energy, key_rank_90} for every captured layer."""
    missing = [k for k in KINDS if k not in capture.kinds]
    if missing:
        raise UserError(f"the capture has no {', '.join(missing)}")
    for r in ranks:
        if not 1 <= r <= basis.head_dim:
            raise UserError(f"--ranks: {r} is out of 1..{basis.head_dim}")
    spectra = compute_spectra(capture, kinds=["key_pre_rope"])
    modules = attention_modules(model)
    rows = []
    for layer in capture.layers:
        row = basis.row(layer)
        if row is None:
            continue
        q = capture.get(layer, "query_post_rope").float()  # (B, Hq, T, D)
        pre, post = capture.get(layer, "key_pre_rope").float(), capture.get(layer, "key_post_rope").float()
        v = capture.get(layer, "value").float()  # (B, H, T, Dv)
        B, H, T, D = pre.shape
        G = q.shape[1] // H
        positions = torch.arange(T)
        allowed = (positions[None, :] <= positions[:, None])[None, None].expand(B, H, T, T)  # (B, H, T, T) causal
        scaling = getattr(modules[layer], "scaling", None)
        rotary = Rotary(model, layer)
        reference, _ = slot_attention(q, post, v, allowed, scaling)  # (B, Hq, T, Dv)
        energy = reference.square().sum(dim=(0, 2, 3)).view(H, G).sum(-1).clamp_min(1e-30)  # (H,)
        vectors, mean = basis.vectors["key_pre_rope"][row], basis.mean["key_pre_rope"][row]  # (H, D, D), (H, D)
        for r in ranks:
            V = vectors[:, :, :r]  # (H, D, r)
            projected = (pre - mean[None, :, None]) @ V @ V.transpose(-1, -2) + mean[None, :, None]  # (B, H, T, D)
            keys = rotary.rotate(projected, positions.expand(B, T))
            out, _ = slot_attention(q, keys, v, allowed, scaling)
            error = ((out - reference).square().sum(dim=(0, 2, 3)).view(H, G).sum(-1) / energy).sqrt()  # (H,)
            for h in range(H):
                rows.append({"layer": layer, "kv_head": h, "rank": r, "output_error": round(float(error[h]), 6),
                             "calibration_energy": round(float(basis.energy["key_pre_rope"][row, h, r - 1]), 6),
                             "key_rank_90": spectra.select("key_pre_rope", layer, h)[0].rank_90_mean})
    return rows


def rank_correlation(rows: list[dict], rank: int) -> float:
    """Spearman correlation between the heads' key rank (90 %) and their rank-``rank`` output error."""
    sub = [r for r in rows if r["rank"] == rank]
    if len(sub) < 3:
        return float("nan")
    x = torch.tensor([r["key_rank_90"] for r in sub], dtype=torch.float64)
    y = torch.tensor([r["output_error"] for r in sub], dtype=torch.float64)
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))
