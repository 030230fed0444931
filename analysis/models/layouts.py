"""The tensor layouts capture understands, checked on every call; anything else is refused.

Capture reads tensors from inside a model it did not write, so every layout it relies on is checked
against the geometry the config gives (B, heads, KV heads, head_dim) and the tokens recorded so far.
A model that hands over anything else gets a one-line ``UserError`` naming the module (its type and
its qualified name in the model), never a capture in the wrong layout.

Keys before RoPE come from forward hooks:
- with a key norm (``k_norm``: Qwen3, Gemma 3, OLMo 2, ...), its output: the norm is the last step
  before RoPE. Families normalise different layouts, so the norm's input is matched against the key
  projection's output (hooked too) in each known layout: Qwen3 (B, T, H, D), Gemma 3 (B, H, T, D),
  OLMo 2 the whole projection (B, T, H*D). Matching values, not just shapes, settles T == H.
- without one, the key projection ``k_proj`` (B, T, H*D), or a fused projection of a known layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from analysis.errors import UserError


@dataclass(frozen=True)
class Geometry:
    """What every captured tensor is checked against (from the config, never guessed)."""

    heads: int
    kv_heads: int
    head_dim: int


def module_names(model: nn.Module) -> Callable[[nn.Module], str]:
    """``describe(module)`` -> "Qwen3RMSNorm model.layers.0.self_attn.k_norm" for error messages."""
    names = {id(m): n for n, m in model.named_modules()}
    return lambda m: f"{type(m).__name__} {names.get(id(m)) or '(not in the model)'}"


def refuse(where: str, problem: str) -> UserError:
    return UserError(f"cannot capture {where}: {problem}; kvlens does not know this attention layout")


# --- what the attention function is handed -------------------------------------------------------
def check_attention_inputs(where: str, query: Tensor, key: Tensor, value: Tensor, geo: Geometry, seen: int,
                sliding_window: int | None) -> int:
    """Check query (B, Hq, q, D), key/value (B, Hkv, L, D); return how many earlier keys are not in ``key``.

    ``key`` must hold every token since recording began (L = seen + q), except on a sliding-window
    layer, whose cache may drop keys that no query of this call can see (L >= q + min(seen, W - 1)).
    """
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise refuse(where, f"query/key/value have {query.ndim}/{key.ndim}/{value.ndim} dims, expected 4 "
                            "(batch, heads, tokens, head_dim)")
    B, Hq, q, D = query.shape
    if (Hq, D) != (geo.heads, geo.head_dim):
        raise refuse(where, f"query is {tuple(query.shape)}, expected (B, {geo.heads}, q, {geo.head_dim})")
    L = key.shape[2]
    if tuple(key.shape) != (B, geo.kv_heads, L, D) or tuple(value.shape[:3]) != (B, geo.kv_heads, L):
        raise refuse(where, f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match query "
                            f"{tuple(query.shape)} with {geo.kv_heads} KV heads")
    total = seen + q
    if L == total:
        return 0
    if sliding_window and q + min(seen, sliding_window - 1) <= L < total:
        return total - L
    if L < q:
        raise refuse(where, f"it was handed {L} keys for {q} queries")
    raise UserError(f"cannot capture {where}: its keys cover {L} tokens but {total} were recorded; record() must "
                    "see every token from the first, through a cache that holds exactly them (not one filled before "
                    "recording, a static or compressed cache, or several sequences inside one record())")


# --- keys before RoPE --------------------------------------------------------------------------------
def _projection_layouts(B: int, T: int, H: int, D: int) -> list[tuple[tuple[int, ...], Callable[[Tensor], Tensor]]]:
    """Known layouts of the key projection (B, T, H*D): (shape, how to bring it to (B, H, T, D)).

    A list, not a dict: when T == H two layouts have the same shape.
    """
    return [
        ((B, T, H * D), lambda x: x.reshape(B, T, H, D).transpose(1, 2)),  # OLMo 2: norm on the whole projection
        ((B, T, H, D), lambda x: x.transpose(1, 2)),  # Qwen3: norm per head, before the transpose
        ((B, H, T, D), lambda x: x),  # Gemma 3: norm per head, after the transpose
    ]


def keys_from_norm(where: str, norm_in: Tensor | None, norm_out: Tensor, projected: Tensor | None,
                   geo: Geometry) -> Tensor:
    """The key norm's output as (B, H, T, D), its layout found from the projection it was fed."""
    H, D = geo.kv_heads, geo.head_dim
    if projected is None or norm_in is None:
        raise refuse(where, "the key norm ran without the key projection before it (or took no positional input)")
    if projected.ndim != 3 or projected.shape[-1] != H * D:
        raise refuse(where, f"the key projection gave {tuple(projected.shape)}, expected (B, T, {H * D})")
    if norm_out.shape != norm_in.shape:
        raise refuse(where, f"the key norm turned {tuple(norm_in.shape)} into {tuple(norm_out.shape)}")
    B, T = projected.shape[:2]
    reference = projected.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
    for shape, to_bhtd in _projection_layouts(B, T, H, D):
        if tuple(norm_in.shape) == shape and torch.equal(to_bhtd(norm_in), reference):
            return to_bhtd(norm_out)  # (B, H, T, D)
    raise refuse(where, f"the key norm's input {tuple(norm_in.shape)} is not the key projection "
                        f"{tuple(projected.shape)} in a known layout ((B, T, H*D), (B, T, H, D) or (B, H, T, D))")


def _split_projection(where: str, out: Tensor, geo: Geometry, parts: int, index: int) -> Tensor:
    """(B, T, ...) holding ``parts`` blocks of H*D -> block ``index`` as (B, H, T, D)."""
    H, D = geo.kv_heads, geo.head_dim
    if out.ndim != 3 or out.shape[-1] != parts * H * D:
        raise refuse(where, f"the projection gave {tuple(out.shape)}, expected (B, T, {parts * H * D})")
    B, T, _ = out.shape
    return out[..., index * H * D:(index + 1) * H * D].reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)


def pre_rope_hooks(attn: nn.Module, geo: Geometry, describe: Callable[[nn.Module], str],
                   keep: Callable[[Tensor], None]) -> list[tuple[nn.Module, Callable]]:
    """(submodule, forward hook) pairs that ``keep`` keys before any rotary embedding as (B, Hkv, T, D)."""
    k_proj, k_norm = getattr(attn, "k_proj", None), getattr(attn, "k_norm", None)
    if isinstance(k_norm, nn.Module):  # norm, then RoPE: the norm's output is the pre-RoPE key
        if not isinstance(k_proj, nn.Module):
            raise refuse(describe(attn), "it has a key norm but no separate k_proj to find its layout from")
        newest: dict[str, Tensor] = {}  # the key projection of the current forward, (B, T, H*D)

        def on_proj(module, args, out):
            newest["keys"] = out

        def on_norm(module, args, out):
            keep(keys_from_norm(describe(module), args[0] if args else None, out, newest.pop("keys", None), geo))

        return [(k_proj, on_proj), (k_norm, on_norm)]
    if isinstance(k_proj, nn.Module):  # Llama, Qwen2, Mistral...
        return [(k_proj, lambda m, a, out: keep(_split_projection(describe(m), out, geo, 1, 0)))]
    family = type(attn).__name__
    # Fused projections differ between families (Falcon's is not NeoX's): only known layouts.
    fused = getattr(attn, "query_key_value", None)
    if family.startswith("GPTNeoX") and isinstance(fused, nn.Module):  # per head [q | k | v]
        def neox(module, args, out):
            H, D = geo.kv_heads, geo.head_dim
            if out.ndim != 3 or out.shape[-1] != 3 * H * D:
                raise refuse(describe(module), f"the projection gave {tuple(out.shape)}, expected (B, T, {3 * H * D})")
            B, T, _ = out.shape
            keep(out.view(B, T, H, 3 * D)[..., D:2 * D].transpose(1, 2))  # (B, H, T, D)
        return [(fused, neox)]
    c_attn = getattr(attn, "c_attn", None)
    if family.startswith("GPT2") and isinstance(c_attn, nn.Module):  # [q | k | v] over all heads
        return [(c_attn, lambda m, a, out: keep(_split_projection(describe(m), out, geo, 3, 1)))]
    raise UserError(
        f"cannot capture pre-RoPE keys of {describe(attn)}: it has no separate k_proj, and its fused "
        "projection layout is not one kvlens knows (GPT-NeoX, GPT-2); leave key_pre_rope out of --kinds"
    )
