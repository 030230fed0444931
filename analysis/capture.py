"""Record queries, keys (pre- and post-RoPE), values and attention statistics of selected layers.

Two public transformers mechanisms, nothing patched:
- an attention function registered with ``AttentionInterface`` ("kvlens_capture") that records the
  post-RoPE query, key and value it is handed, computes the model's own eager attention, and folds
  the weights into per-key statistics (attention received, number of queries that saw the key);
- forward hooks on the key projection, which see keys before RoPE is applied.

Memory is layers x heads x T x d: a T x T map is kept only for ``maps_window`` query positions.
Recording works in a prefill and in every ``generate()`` step (tokens are appended along T).
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn

from analysis.compress.base import group_mean
from analysis.errors import UserError
from analysis.models import LoadedModel, attention_modules, config_summary

KINDS = ("query_post_rope", "key_pre_rope", "key_post_rope", "value")
STATS = ("attn_received", "attn_received_kv", "attn_count")
_IMPL = "kvlens_capture"
_ACTIVE: "WeakKeyDictionary[nn.Module, _LayerRecord]" = WeakKeyDictionary()


@dataclass
class Capture:
    """What a recording holds. Tensors are keyed ``layers.{i}.{name}``.

    kinds: (B, H, T, D), H = query heads for ``query_post_rope``, KV heads otherwise.
    attn_received (B, Hq, T) / attn_received_kv (B, Hkv, T, GQA group mean): attention each key
    received, summed over queries; attn_count (B, T): how many queries saw each key.
    """

    tensors: dict[str, Tensor]
    meta: dict

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def kinds(self) -> list[str]:
        return list(self.meta["kinds"])

    def get(self, layer: int, name: str) -> Tensor:
        key = f"layers.{layer}.{name}"
        if key not in self.tensors:
            if layer not in self.layers:
                raise UserError(f"layer {layer} is not in this capture (layers {self.meta['layers']})")
            raise UserError(f"this capture has no {name!r} (it has {', '.join(self.kinds)})")
        return self.tensors[key]


@dataclass
class _LayerRecord:
    kinds: tuple[str, ...]
    stats: bool
    maps_window: tuple[int, int] | None
    device: torch.device | None
    dtype: torch.dtype
    chunks: dict[str, list[Tensor]] = field(default_factory=dict)
    received: Tensor | None = None  # (B, Hq, L) float32
    count: Tensor | None = None  # (B, L) float32
    maps: list[Tensor] = field(default_factory=list)
    seen: int = 0  # query tokens recorded so far

    def keep(self, name: str, tensor: Tensor) -> None:
        if name in self.kinds:
            # a copy, never a view: a compressed cache later merges into its values in place
            out = tensor.detach().to(self.device or tensor.device, self.dtype, copy=True)
            self.chunks.setdefault(name, []).append(out)

    def observe(self, weights: Tensor) -> None:
        """weights: (B, Hq, q, L) softmax rows of the newest q queries over all L keys."""
        B, Hq, q, L = weights.shape
        if self.stats:
            received = weights.float().sum(dim=2)  # (B, Hq, L)
            seen = torch.full((L,), float(q), device=weights.device)
            seen[L - q :] = torch.arange(q, 0, -1, device=weights.device, dtype=torch.float32)
            if self.received is not None:  # earlier keys: pad the running sums to the new length
                received[..., : self.received.shape[-1]] += self.received.to(weights.device)
                seen = seen + nn.functional.pad(self.count.to(weights.device), (0, L - self.count.shape[-1]))
            self.received, self.count = received, seen.expand(B, L).clone()
        if self.maps_window is not None:
            start, stop = self.maps_window
            rows = torch.arange(self.seen, self.seen + q, device=weights.device)
            wanted = (rows >= start) & (rows < stop)
            if bool(wanted.any()):
                block = weights[:, :, wanted, : min(L, stop)].float()  # (B, Hq, w, <=stop)
                block = nn.functional.pad(block, (0, stop - block.shape[-1]))  # (B, Hq, w, stop)
                self.maps.append(block.to(self.device or block.device))
        self.seen += q


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention of the module's own model family, plus recording when the layer is watched."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UserError(f"{type(module).__name__} has no eager attention to capture weights from")
    output, weights = eager(module, query, key, value, attention_mask, **kwargs)
    record = _ACTIVE.get(module)
    if record is not None:
        q = query.shape[2]
        record.keep("query_post_rope", query)
        record.keep("key_post_rope", key[:, :, -q:])
        record.keep("value", value[:, :, -q:])
        if weights is None:
            raise UserError(f"{type(module).__name__}'s eager attention returned no weights")
        record.observe(weights)
    return output, weights


def _pre_rope_key_hook(attn: nn.Module, head_dim: int):
    """(submodule, fn(output) -> (B, Hkv, T, D)) giving keys before any rotary embedding."""
    if hasattr(attn, "k_norm") and isinstance(attn.k_norm, nn.Module):  # Qwen3-style: norm, then RoPE
        return attn.k_norm, lambda out: out.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
    if isinstance(getattr(attn, "k_proj", None), nn.Module):  # Llama, Qwen2, Mistral...
        def split(out):
            B, T, _ = out.shape
            return out.view(B, T, -1, head_dim).transpose(1, 2)  # (B, H, T, D)
        return attn.k_proj, split
    family = type(attn).__name__
    # Fused projections differ between families (Falcon's is not NeoX's): only known layouts.
    if family.startswith("GPTNeoX") and isinstance(getattr(attn, "query_key_value", None), nn.Module):
        def neox(out):
            B, T, _ = out.shape
            return out.view(B, T, -1, 3 * head_dim)[..., head_dim : 2 * head_dim].transpose(1, 2)
        return attn.query_key_value, neox
    if family.startswith("GPT2") and isinstance(getattr(attn, "c_attn", None), nn.Module):  # [q | k | v]
        def gpt2(out):
            B, T, E3 = out.shape
            return out[..., E3 // 3 : 2 * E3 // 3].reshape(B, T, -1, head_dim).transpose(1, 2)
        return attn.c_attn, gpt2
    raise UserError(
        f"cannot capture pre-RoPE keys of {family}: it has no separate k_proj, and its fused "
        "projection layout is not one kvlens knows (GPT-NeoX, GPT-2); leave key_pre_rope out of --kinds"
    )


@contextmanager
def record(
    model: nn.Module,
    layers: list[int] | None = None,
    kinds: tuple[str, ...] = KINDS,
    stats: bool = True,
    maps_window: tuple[int, int] | None = None,
    offload: bool = True,
    dtype: torch.dtype = torch.float32,
):
    """Context manager: run the model (forward or ``generate``) inside it, then ``.result()``.

    ``layers`` None means all; ``offload`` moves every recorded tensor to the CPU as it arrives;
    ``maps_window=(start, stop)`` also keeps full attention rows for query positions in that window.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise UserError(f"unknown kind(s) {sorted(unknown)}: choose from {', '.join(KINDS)}")
    modules = attention_modules(model)
    chosen = sorted(modules) if layers is None else list(layers)
    bad = [i for i in chosen if i not in modules]
    if bad:
        raise UserError(f"layer(s) {bad} out of range: the model has layers 0-{max(modules)}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(_IMPL, _capture_attention)
    # Without a mask function of its own, a registered attention gets attention_mask=None (no causal
    # mask at all): give it the eager one, which the eager attention it wraps expects.
    AttentionMaskInterface.register(_IMPL, eager_mask)
    head_dim = config_summary(model.config)["head_dim"]
    device = torch.device("cpu") if offload else None
    recorder = _Recorder({i: _LayerRecord(tuple(kinds), stats, maps_window, device, dtype) for i in chosen},
                         kv_heads=config_summary(model.config)["num_kv_heads"])
    handles = []
    previous = model.config._attn_implementation
    try:
        for i in chosen:
            _ACTIVE[modules[i]] = recorder.records[i]
            if "key_pre_rope" in kinds:
                sub, extract = _pre_rope_key_hook(modules[i], head_dim)
                rec = recorder.records[i]
                handles.append(sub.register_forward_hook(lambda m, a, out, r=rec, f=extract: r.keep("key_pre_rope", f(out))))
        model.set_attn_implementation(_IMPL)
        yield recorder
    finally:
        for h in handles:
            h.remove()
        for i in chosen:
            _ACTIVE.pop(modules[i], None)
        model.set_attn_implementation(previous)


class _Recorder:
    def __init__(self, records: dict[int, _LayerRecord], kv_heads: int | None = None):
        self.records = records
        self.kv_heads = kv_heads  # from the config: used when no recorded kind has KV heads

    def result(self, meta: dict | None = None) -> Capture:
        silent = [i for i, rec in self.records.items() if rec.seen == 0]
        if silent:
            raise UserError(f"nothing was recorded for layer(s) {silent}: either the model was not run inside "
                            "record(), or its attention does not go through transformers' AttentionInterface "
                            "and cannot be captured")
        tensors = {}
        for i, rec in self.records.items():
            for name, chunks in rec.chunks.items():
                tensors[f"layers.{i}.{name}"] = torch.cat(chunks, dim=2).contiguous()
            if rec.received is not None:
                tensors[f"layers.{i}.attn_received"] = rec.received.to(rec.device or rec.received.device)
                tensors[f"layers.{i}.attn_count"] = rec.count.to(rec.received.device if rec.device is None else rec.device)
                kv_kind = next((tensors[f"layers.{i}.{k}"] for k in ("value", "key_post_rope", "key_pre_rope")
                                if f"layers.{i}.{k}" in tensors), None)
                kv_heads = kv_kind.shape[1] if kv_kind is not None else self.kv_heads
                if kv_heads is not None:
                    tensors[f"layers.{i}.attn_received_kv"] = group_mean(tensors[f"layers.{i}.attn_received"], kv_heads)
            if rec.maps:
                tensors[f"layers.{i}.attn_maps"] = torch.cat(rec.maps, dim=2).contiguous()
        first = next(iter(self.records.values()))
        meta = dict(meta or {})
        meta.update(layers=sorted(self.records), kinds=list(first.kinds), tokens=first.seen,
                    dtype=str(first.dtype).removeprefix("torch."), maps_window=first.maps_window)
        return Capture(tensors, meta)


def capture_sequences(
    loaded: LoadedModel,
    sequences: list[tuple[str, list[int]]],
    layers: list[int] | None = None,
    kinds: tuple[str, ...] = KINDS,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    on_progress=None,
    maps_window: tuple[int, int] | None = None,
) -> Capture:
    """Prefill each (text_id, token ids) sequence, recording; stack the results along batch B.

    Sequences must have equal length (``corpora.token_sequences`` makes them so). ``maps_window``
    as in ``record``: also keep the full attention rows of those query positions.
    """
    from tqdm.auto import tqdm

    lengths = {len(ids) for _, ids in sequences}
    if len(lengths) != 1:
        raise UserError(f"sequences must all have the same length, got {sorted(lengths)}")
    parts = []
    bar = tqdm(sequences, desc="capture", unit="seq", disable=not progress)
    for n, (_, ids) in enumerate(bar):
        with record(loaded.model, layers=layers, kinds=kinds, dtype=dtype, maps_window=maps_window) as rec, \
                torch.inference_mode():
            loaded.model(torch.tensor([ids], device=loaded.device), use_cache=True)
        parts.append(rec.result())
        if on_progress:
            on_progress((n + 1) / len(sequences))
    tensors = {key: torch.cat([p.tensors[key] for p in parts], dim=0) for key in parts[0].tensors}
    meta = parts[0].meta | {
        "kind": "capture",
        "model": loaded.model_id,
        "config": loaded.summary(),
        "text_ids": [text_id for text_id, _ in sequences],
        "token_ids": [list(ids) for _, ids in sequences],
        "positions": list(range(lengths.pop())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Capture(tensors, meta)


def apply_rope(model: nn.Module, keys: Tensor, positions: Tensor) -> Tensor:
    """Rotate pre-RoPE keys (B, H, T, D) to ``positions`` (B, T) with the model's own rotary code."""
    rotary = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
    if rotary is None:
        return keys  # absolute-position model (GPT-2): keys carry no rotation
    attn = next(iter(attention_modules(model).values()))
    rotate = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb")
    cos, sin = rotary(keys, positions)
    _, rotated = rotate(keys, keys, cos, sin)
    return rotated
