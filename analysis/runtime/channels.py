"""Keys (and values) held as r coefficients of a calibrated basis, for ``CompressedLayer``.

Keys reach a cache post-RoPE. ``LayerCodec.encode`` rotates them back to pre-RoPE with the model's
own rotary code at the token's position (RoPE is an orthogonal rotation, so the inverse, the same
rotation with -sin, is exact to rounding; no hook on k_proj is needed, and for models with a key
norm this is the post-norm key, the vector RoPE rotates), subtracts the basis mean and keeps the r
coefficients c = (k_pre - mean) V (V: (D, r)). ``decode_keys`` reconstructs k_pre = c V^T + mean for
every slot and rotates it to the slot's own position, so the attention kernel receives ordinary
post-RoPE keys and nothing else changes (every policy, generate(), the evaluators).

Why reconstruct rather than score in the low-rank space: q . R_p (V c) needs R_p V per slot position
p (RoPE mixes the channel pairs differently at every position), which costs what reconstruction
costs (C x D x r) and is exact only for models without RoPE; reconstruction is exact for all and
keeps one kernel.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import Tensor, nn

from analysis.errors import UserError
from analysis.jobs.basis import LowRank
from analysis.models.loading import attention_modules


class Rotary:
    """The model's rotary embedding for one layer, resolved once: ``rotate(keys (B, H, T, D), positions)``.

    ``positions`` (B, T) shared by the heads, or (B, H, T) per head (compressed slots). Models without
    a rotary module (GPT-2) get the keys back unchanged.
    """

    def __init__(self, model: nn.Module, layer: int | None = None):
        self.module = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
        modules = attention_modules(model)
        attn = modules[layer] if layer is not None else next(iter(modules.values()))
        self.apply = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        self.extra = {}
        if self.module is not None and "layer_type" in inspect.signature(self.module.forward).parameters:
            if layer is None:
                raise UserError(f"{type(model).__name__} rotates each layer type differently: pass layer=")
            config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
            self.extra["layer_type"] = config.layer_types[layer]

    def rotate(self, keys: Tensor, positions: Tensor, inverse: bool = False) -> Tensor:
        if self.module is None:
            return keys
        B, H, T, D = keys.shape
        if positions.dim() == 3:  # (B, H, T): one position per (head, slot)
            flat = keys.reshape(B, 1, H * T, D)  # (B, 1, H*T, D)
            cos, sin = self.module(flat, positions.reshape(B, H * T), **self.extra)  # (B, H*T, D)
            _, out = self.apply(flat, flat, cos, -sin if inverse else sin)
            return out.reshape(B, H, T, D)
        cos, sin = self.module(keys, positions, **self.extra)  # (B, T, D)
        _, out = self.apply(keys, keys, cos, -sin if inverse else sin)
        return out


class LayerCodec:
    """One layer's projections: keys as coefficients of pre-RoPE directions, values of value directions."""

    def __init__(self, model: nn.Module, layer: int, lowrank: LowRank):
        self.key = lowrank.layer("key_pre_rope", layer)  # (vectors (H, D, R), mean (H, D), ranks (H,)) or None
        self.value = lowrank.layer("value", layer)
        self.rotary = Rotary(model, layer) if self.key is not None else None
        self._moved = None

    @property
    def active(self) -> bool:
        return self.key is not None or self.value is not None

    def _to(self, like: Tensor) -> None:
        if self._moved != (like.device, like.dtype):
            move = lambda part: None if part is None else tuple(t.to(like.device, like.dtype if t.is_floating_point()  # noqa: E731
                                                                     else t.dtype) for t in part)
            self.key, self.value = move(self.key), move(self.value)
            self._moved = (like.device, like.dtype)

    def widths(self, head_dim: int, value_dim: int) -> tuple[Tensor, Tensor]:
        """Logical coefficients per slot of each head: (H,) key widths and (H,) value widths."""
        H = (self.key or self.value)[0].shape[0]
        k = self.key[2].cpu() if self.key is not None else torch.full((H,), head_dim)
        v = self.value[2].cpu() if self.value is not None else torch.full((H,), value_dim)
        return k, v

    def encode(self, keys: Tensor, values: Tensor, first: int) -> tuple[Tensor, Tensor]:
        """Post-RoPE keys (B, H, q, D) at positions first.., values (B, H, q, Dv) -> what the slots hold."""
        self._to(keys)
        if self.key is not None:
            B, _, q, _ = keys.shape
            positions = torch.arange(first, first + q, device=keys.device).expand(B, q)  # (B, q)
            pre = self.rotary.rotate(keys, positions, inverse=True)  # (B, H, q, D) pre-RoPE
            vectors, mean, _ = self.key
            keys = (pre - mean[None, :, None, :]) @ vectors[None]  # (B, H, q, R)
        if self.value is not None:
            values = values @ self.value[0][None]  # (B, H, q, Rv)
        return keys, values

    def decode(self, keys: Tensor, values: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """What the slots hold -> post-RoPE keys (B, H, C, D) at the slots' ``positions`` (B, H, C), values."""
        self._to(keys)
        if self.key is not None:
            vectors, mean, _ = self.key
            pre = keys @ vectors.transpose(-1, -2)[None] + mean[None, :, None, :]  # (B, H, C, D)
            keys = self.rotary.rotate(pre, positions.clamp_min(0))  # free slots: any position, masked anyway
        if self.value is not None:
            values = values @ self.value[0].transpose(-1, -2)[None]  # (B, H, C, Dv)
        return keys, values

    def basis_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for part in (self.key, self.value) if part is not None
                   for t in part[:2])
