"""Record queries, keys (pre- and post-RoPE), values and attention statistics of selected layers.

Two public transformers mechanisms, nothing patched:
- an attention function registered with ``AttentionInterface`` ("kvlens_capture") that records the
  post-RoPE query, key and value it is handed, computes the model's own eager attention, and folds
  the weights into per-key statistics (attention received, number of queries that saw the key);
- forward hooks on the key projection (or the key norm, where there is one), which see keys before
  RoPE is applied (``analysis.models.layouts``).

Every tensor layout this relies on is checked on every call (``analysis.models.layouts``): a model whose
attention hands over anything else is refused with a one-line error naming the module. Sliding-window
layers (Gemma 2/3, Mistral-style) are recorded as the model runs them: keys outside a query's window
receive 0 attention and are not counted as seen by it.

Each layer's attention arithmetic, as the model's attention call is told it (``scaling``, ``softcap``,
``sliding_window``: the arguments the kvlens kernel takes too), is kept in ``meta["attention"]``;
``Capture.attention(layer)`` gives it to every study that recomputes attention from the captured
q/k/v, so Gemma's ``query_pre_attn_scalar``, soft-capping and windows are applied there too.

Memory is layers x heads x T x d: a T x T map is kept only for ``maps_window`` query positions.
Recording works in a prefill and in every ``generate()`` step (tokens are appended along T).
"""

from __future__ import annotations

import inspect
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from analysis.errors import UserError
from analysis.models.layouts import Geometry, check_attention_inputs, module_names, pre_rope_hooks, refuse
from analysis.models.loading import LoadedModel, attention_modules, config_summary, sliding_layers
from analysis.ops import AttentionSpec, group_mean, seen_counts
from analysis.runtime.channels import Rotary

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

    def attention(self, layer: int) -> AttentionSpec:
        """The layer's scaling, soft-cap and window as the model applied them (captures made before
        these were recorded: 1/sqrt(D), no cap, full causal attention)."""
        return AttentionSpec.from_dict((self.meta.get("attention") or {}).get(str(layer)))


@dataclass
class _LayerRecord:
    kinds: tuple[str, ...]
    stats: bool
    maps_window: tuple[int, int] | None
    device: torch.device | None
    dtype: torch.dtype
    geometry: Geometry
    where: str  # the attention module, for errors: "LlamaAttention model.layers.3.self_attn"
    chunks: dict[str, list[Tensor]] = field(default_factory=dict)
    received: Tensor | None = None  # (B, Hq, L) float32
    count: Tensor | None = None  # (L,) float32
    maps: list[Tensor] = field(default_factory=list)
    seen: int = 0  # query tokens recorded so far
    calls: int = 0  # attention calls recorded so far
    spec: AttentionSpec | None = None  # scaling, soft-cap, window the model's attention call was given

    def keep(self, name: str, tensor: Tensor) -> None:
        if name in self.kinds:
            # a copy, never a view: a compressed cache later merges into its values in place
            out = tensor.detach().to(self.device or tensor.device, self.dtype, copy=True)
            self.chunks.setdefault(name, []).append(out)

    def observe(self, weights: Tensor, dropped: int = 0, window: int | None = None) -> None:
        """weights: (B, Hq, q, L') softmax rows of the newest q queries over the newest L' keys.

        ``dropped`` earlier keys were not handed over (a sliding-window cache): they lie outside every
        query's window, so they received 0. ``window`` W: query p sees key k iff p - W < k <= p.
        """
        B, Hq, q, _ = weights.shape
        L = self.seen + q  # every key so far
        if self.stats:
            received = weights.new_zeros((B, Hq, L), dtype=torch.float32)
            received[..., dropped:] = weights.float().sum(dim=2)
            if self.received is not None:  # earlier keys: add the running sums
                received[..., : self.received.shape[-1]] += self.received.to(weights.device)
            count = seen_counts(torch.arange(L, device=weights.device), self.seen, q, window)  # (L,)
            if self.count is not None:
                count[: self.count.shape[-1]] += self.count.to(weights.device)
            self.received, self.count = received, count
        if self.maps_window is not None:
            start, stop = self.maps_window
            rows = torch.arange(self.seen, self.seen + q, device=weights.device)
            wanted = (rows >= start) & (rows < stop)
            if bool(wanted.any()) and stop > dropped:
                block = weights.new_zeros((B, Hq, int(wanted.sum()), stop), dtype=torch.float32)  # (B, Hq, w, stop)
                cols = weights[:, :, wanted, : stop - dropped].float()  # keys dropped.. of those rows
                block[..., dropped : dropped + cols.shape[-1]] = cols
                self.maps.append(block.to(self.device or block.device))
        self.seen += q


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention of the module's own model family, plus recording when the layer is watched."""
    record = _ACTIVE.get(module)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        where = record.where if record is not None else type(module).__name__
        raise UserError(f"cannot capture {where}: its model family has no eager attention to take weights from")
    if record is None:
        return eager(module, query, key, value, attention_mask, **kwargs)
    watched = record.where
    if getattr(module, "is_causal", True) is False:
        raise refuse(watched, "its attention is not causal")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    dropped = check_attention_inputs(watched, query, key, value, record.geometry, record.seen, window)
    output, weights = eager(module, query, key, value, attention_mask, **kwargs)
    q = query.shape[2]
    record.calls += 1
    record.spec = AttentionSpec(kwargs.get("scaling"), kwargs.get("softcap"), window)
    record.keep("query_post_rope", query)
    record.keep("key_post_rope", key[:, :, -q:])
    record.keep("value", value[:, :, -q:])
    if "key_pre_rope" in record.kinds:  # the hook must have handed exactly this call's keys
        pre = record.chunks.get("key_pre_rope", [])
        if len(pre) != record.calls or tuple(pre[-1].shape) != tuple(key[:, :, -q:].shape):
            got = tuple(pre[-1].shape) if pre else None
            raise refuse(watched, f"keys before RoPE were {got} for post-RoPE keys {tuple(key[:, :, -q:].shape)} "
                                  f"({len(pre)} pre-RoPE chunks for {record.calls} attention calls)")
    if weights is None or tuple(weights.shape) != (query.shape[0], query.shape[1], q, key.shape[2]):
        got = None if weights is None else tuple(weights.shape)
        raise refuse(watched, f"its eager attention returned weights {got} for query {tuple(query.shape)} "
                              f"and key {tuple(key.shape)}")
    record.observe(weights, dropped, window)
    return output, weights


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

    AttentionInterface.register(_IMPL, _capture_attention)
    # Without a mask function of its own, a registered attention gets attention_mask=None (no causal
    # mask at all): give it the eager one, which the eager attention it wraps expects.
    AttentionMaskInterface.register(_IMPL, eager_mask)
    g = config_summary(model.config)
    geometry = Geometry(heads=g["num_heads"], kv_heads=g["num_kv_heads"], head_dim=g["head_dim"])
    describe = module_names(model)
    device = torch.device("cpu") if offload else None
    recorder = _Recorder({i: _LayerRecord(tuple(kinds), stats, maps_window, device, dtype, geometry,
                                          describe(modules[i]))
                          for i in chosen}, kv_heads=geometry.kv_heads)
    handles = []
    previous = model.config._attn_implementation
    try:
        for i in chosen:
            _ACTIVE[modules[i]] = rec = recorder.records[i]
            if "key_pre_rope" in kinds:
                for sub, hook in pre_rope_hooks(modules[i], geometry, describe, partial(rec.keep, "key_pre_rope")):
                    handles.append(sub.register_forward_hook(hook))
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
                B = rec.received.shape[0]
                count = rec.count.expand(B, -1).clone()  # (B, T): the same for every row (no padding)
                tensors[f"layers.{i}.attn_count"] = count.to(rec.device or count.device)
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
                    dtype=str(first.dtype).removeprefix("torch."), maps_window=first.maps_window,
                    attention={str(i): (rec.spec or AttentionSpec()).to_dict() for i, rec in self.records.items()})
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

    lengths = {len(ids) for _, ids in sequences}
    if len(lengths) != 1:
        raise UserError(f"sequences must all have the same length, got {sorted(lengths)}")
    parts = []
    bar = tqdm(sequences, desc="capture", unit="seq", disable=not progress)
    only_last = last_logit_only(loaded.model)
    for n, (_, ids) in enumerate(bar):
        with record(loaded.model, layers=layers, kinds=kinds, dtype=dtype, maps_window=maps_window) as rec, \
                torch.inference_mode():
            loaded.model(torch.tensor([ids], device=loaded.device), use_cache=True, **only_last)
        parts.append(rec.result())
        if on_progress:
            on_progress((n + 1) / len(sequences))
    tensors = {key: torch.cat([p.tensors[key] for p in parts], dim=0) for key in parts[0].tensors}
    meta = parts[0].meta | {
        "kind": "capture",
        "model": loaded.model_id,
        "config": loaded.summary(),
        "sliding_layers": sorted(sliding_layers(loaded.model.config)),  # not compressed by CompressedCache
        "text_ids": [text_id for text_id, _ in sequences],
        "token_ids": [list(ids) for _, ids in sequences],
        "positions": list(range(lengths.pop())),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Capture(tensors, meta)


def last_logit_only(model: nn.Module) -> dict:
    """Ask for the last position's logits only, where the model takes it: a capture reads no logits,
    and all of them cost T x vocabulary floats (200 MB at 1,024 tokens for a 49k vocabulary)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def apply_rope(model: nn.Module, keys: Tensor, positions: Tensor, layer: int | None = None) -> Tensor:
    """Rotate pre-RoPE keys (B, H, T, D) to ``positions`` (B, T) with the model's own rotary code.

    ``layer`` is needed where layer types rotate differently (Gemma 3: sliding layers use a local base).
    """
    return Rotary(model, layer).rotate(keys, positions)
