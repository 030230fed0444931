"""Replay decoding token by token through the real ``CompressedCache`` and record one layer's slots.

Nothing here re-implements a method: the model decodes the text one token at a time with a
``CompressedCache`` (the same object ``generate()`` and the perplexity evaluator use), and after
every step the chosen layer's ``LayerState`` is read back. What changed between two steps is read
off the state itself: the position that disappeared is the victim, and a surviving slot whose value
changed is the one it was merged into.

Which original tokens a slot's value mixes (WeightedKV's cascade) is the cache's own bookkeeping
(``CompressedCache(track_mixing=T)`` fills ``state.mixing`` with the same linear merges as the values).

``merge_preview`` asks the same question of a capture: if this full cache had to give up one slot,
which position would the policy remove, and into which neighbour would its value go.

Sliding-window layers (Gemma 2/3) are refused by both with a one-line error: ``CompressedCache``
leaves them to the model's own sliding cache, so no method acts there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from analysis.compress import LayerState, Policy
from analysis.errors import UserError
from analysis.models.loading import attention_modules, compressed_layers
from analysis.ops import query_groups
from analysis.runtime.cache import CompressedCache


@dataclass
class HeadSlots:
    """One KV head's cache at one step, in position order."""

    positions: list[int]  # original token positions held
    score: list[float]  # ā = a / n of each held slot
    evicted: int | None = None  # position removed at this step
    merged_into: list[int] = field(default_factory=list)  # held positions whose value changed at this step


class _Stop(Exception):
    """Raised after the recorded layer: the layers above it cannot change its cache, so they are skipped."""


def _stop_after(module, args, output):
    raise _Stop


@dataclass
class Replay:
    """``steps[t][h]``: head h of ``layer`` right after token t was decoded (appended, observed, compressed).

    ``mixing[t][h]``: (len(positions), T) float32, row i = weights of the original tokens mixed into
    slot i's value (one-hot for an untouched slot), as the cache tracks it (``track_mixing``).
    """

    method: str
    budget: int | None
    sinks: int
    recent: int | None
    layer: int
    token_ids: list[int]
    steps: list[list[HeadSlots]]
    mixing: list[list[np.ndarray]] | None
    values: list[list[np.ndarray]] | None = None  # [step][head] (len(positions), D) when asked for

    @property
    def heads(self) -> int:
        return len(self.steps[0]) if self.steps else 0

    def next_merge(self, step: int, head: int) -> tuple[int | None, list[int]]:
        """(victim, merged-into positions) of the step after ``step``: what the policy does next."""
        if step + 1 >= len(self.steps):
            return None, []
        nxt = self.steps[step + 1][head]
        return nxt.evicted, nxt.merged_into


def right_neighbour(rep: Replay, step: int, head: int) -> int | None:
    """The held position right after the one removed at ``step``: WeightedKV's target, to set beside another
    method's (a similarity merge's target is the most cosine-similar key instead). None when nothing left."""
    now = rep.steps[step][head]
    if now.evicted is None or step == 0:
        return None
    before = rep.steps[step - 1][head].positions + [step]  # the token decoded at ``step`` sits at position step
    later = [p for p in before if p > now.evicted and p in now.positions]
    return min(later) if later else None


def _snapshot(state: LayerState, row: int = 0) -> list[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """Per KV head: (positions (n,), values (n, D) float32, ā (n,), mixing (n, T) or None), by position."""
    valid = state.valid[row]  # (H, C)
    score = (state.acc[row] / state.count[row].clamp_min(1.0)).float()  # (H, C)
    mixing = state.mixing
    heads = []
    for h in range(valid.shape[0]):
        slots = valid[h].nonzero()[:, 0]
        slots = slots[state.positions[row, h, slots].argsort()]  # physical slot order is not position order in v2
        heads.append((state.positions[row, h, slots].cpu(), state.values[row, h, slots].float().cpu(),
                      score[h, slots].cpu(), None if mixing is None else mixing[row, h, slots].float().cpu()))
    return heads


def _diff(before: tuple, after: tuple, newest: int | None = None) -> tuple[int | None, list[int]]:
    """(removed position, positions whose value changed) between two snapshots of one head."""
    old = dict(zip(before[0].tolist(), before[1]))
    now = dict(zip(after[0].tolist(), after[1]))
    gone = sorted((set(old) | ({newest} if newest is not None else set())) - set(now))
    if len(gone) > 1:
        raise RuntimeError(f"{len(gone)} slots left in one step; replay expects one token per step")
    changed = [p for p in now if p in old and not torch.equal(old[p], now[p])]
    return (gone[0] if gone else None), sorted(changed)


def _check_policy(policy) -> None:
    if not isinstance(policy, Policy):
        raise UserError(f"give a configured policy (analysis.compress.make_policy(name, budget)), not {policy!r}")


def open_cache(model, policy: Policy, tokens: int) -> CompressedCache:
    """A CompressedCache that tracks, for ``tokens`` original tokens, what each slot's value mixes."""

    return CompressedCache(model, policy, track_mixing=tokens)


@torch.inference_mode()
def replay(model, token_ids: list[int], policy: Policy, layer: int, on_progress=None,
           keep_values: bool = False) -> Replay:
    """Decode ``token_ids`` one at a time through a CompressedCache under ``policy``; record ``layer`` after
    each token.

    ``keep_values`` also keeps every step's cached values (for checking the mixtures against them).
    """
    _check_policy(policy)
    if not token_ids:
        raise UserError("replay needs at least one token")
    if not 0 <= layer < model.config.num_hidden_layers:
        raise UserError(f"layer {layer} out of range: the model has layers 0-{model.config.num_hidden_layers - 1}")
    compressed_layers(model.config, [layer])  # a sliding-window layer: one-line error
    T = len(token_ids)
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    cache = open_cache(model, policy, T)

    # Registered after the cache's own hook (CompressedCache installs it), so the layer is compressed first.
    stopper = attention_modules(model)[layer].register_forward_hook(_stop_after)
    steps, mixing, values = [], [], []
    before = None
    try:
        for t in range(T):
            try:
                model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((1, 1), t, device=device),
                      use_cache=True)
            except _Stop:
                pass
            after = _snapshot(cache.layers[layer].state)
            heads = []
            for h, snap in enumerate(after):
                victim, changed = _diff(before[h], snap, newest=t) if before is not None else (None, [])
                heads.append(HeadSlots(snap[0].tolist(), snap[2].tolist(), victim, changed))
            steps.append(heads)
            if after[0][3] is not None:
                mixing.append([snap[3][:, :T].numpy().astype(np.float32) for snap in after])  # (slots, T) each
            if keep_values:
                values.append([snap[1].numpy() for snap in after])
            before = after
            if on_progress:
                on_progress((t + 1) / T)
    finally:
        stopper.remove()
        cache.close()  # restores the model's attention implementation, removes the cache's hooks
    return Replay(policy.name, policy.budget, policy.sinks, policy.recent, layer, list(token_ids), steps,
                  mixing if len(mixing) == T else None, values if keep_values else None)


def merge_preview(capture, layer: int, policy: Policy, row: int = 0) -> list[tuple[int | None, list[int]]]:
    """Per KV head of ``layer``: (victim, merged-into positions) if the capture's full cache lost one slot.

    The cache holds every captured token with the statistics the capture recorded (attention
    received and queries that saw it); the policy keeps its ``sinks`` and ``recent`` protected and
    runs its real ``compress`` down by one slot (its budget becomes the capture's length less one).
    """
    _check_policy(policy)
    if layer in (capture.meta.get("sliding_layers") or []):
        raise UserError(f"layer {layer} uses a sliding window: CompressedCache does not compress it, "
                        "so no method would remove anything there")
    keys = capture.get(layer, "key_post_rope")[row : row + 1]  # (1, H, T, D)
    values = capture.get(layer, "value")[row : row + 1].float()  # (1, H, T, D)
    received = capture.get(layer, "attn_received_kv")[row : row + 1].float()  # (1, H, T)
    count = capture.get(layer, "attn_count")[row : row + 1].float()  # (1, T)
    T = keys.shape[2]
    if T - 1 <= policy.sinks + policy.recent:
        raise UserError(f"the capture has {T} tokens: too few for sinks {policy.sinks} + recent {policy.recent}")
    state = LayerState.empty(keys, values)
    state.append(keys, values, torch.arange(T))
    # Statistics by original position, wherever the state put each token.
    where = state.positions.clamp_min(0)  # (1, H, C)
    held = state.valid
    state.acc = received.gather(2, where) * held
    state.count = count[:, None, :].expand_as(received).gather(2, where) * held
    before = _snapshot(state)
    replace(policy, budget=T - 1).compress(state)  # the same sinks and recent, one slot fewer than the capture
    return [_diff(b, a) for b, a in zip(before, _snapshot(state))]


def average_attention(capture, layer: int, row: int = 0) -> Tensor:
    """(H, T) ā = a / n per KV head and position: attention received over queries that saw the token."""
    received = capture.get(layer, "attn_received_kv")[row].float()  # (H, T)
    count = capture.get(layer, "attn_count")[row].float()  # (T,)
    return received / count.clamp_min(1.0)


def attention_window(capture, layer: int, head: int, row: int = 0) -> tuple[np.ndarray, list[int]] | None:
    """(w, T) attention of KV head ``head``'s query group (mean over the group) for the captured window.

    Returns (weights, query positions), or None when the capture kept no attention maps.
    """
    key = f"layers.{layer}.attn_maps"
    window = capture.meta.get("maps_window")
    if key not in capture.tensors or not window:
        return None
    maps = capture.tensors[key][row].float()  # (Hq, w, stop)
    kv_heads = capture.get(layer, "attn_received_kv").shape[1]
    weights = query_groups(maps, kv_heads, dim=0)[head].mean(dim=0)  # (H, G, w, stop) -> (w, stop)
    return weights.numpy(), list(range(window[0], window[0] + weights.shape[0]))
