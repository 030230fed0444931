"""A transformers ``Cache`` that runs a compression policy inside ``generate()`` and ``forward``.

    cache = CompressedCache(model, method="weightedkv", budget=256)
    model.generate(ids, past_key_values=cache, max_new_tokens=100)

Each step the layer appends the new keys/values (``update``, called by the model before
attention), the model attends over all of them (so the overflowing step sees m + 1 slots, as in
Algorithm 1), and a forward hook on the attention module then hands the softmax weights to the
layer, which updates its statistics and lets the policy shrink it back to the budget.

Keys are cached post-RoPE with their original positions (``generate`` passes explicit
``position_ids``), so nothing is re-rotated after eviction. Batches must be unpadded (equal-length
rows): the model's padding mask indexes physical slots, which compression reorders.
"""

from __future__ import annotations

import warnings
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer

from analysis import attention
from analysis.compress import LayerState, Policy, make_policy
from analysis.errors import UserError
from analysis.models import attention_modules

_HOOKED: "WeakKeyDictionary[nn.Module, list]" = WeakKeyDictionary()
_WEIGHT_IMPLS = ("eager", "kvlens_capture", attention.NAME)


class CompressedLayer(DynamicLayer):
    """One layer's cache: a ``LayerState`` kept within budget by the shared ``Policy``."""

    is_croppable = False

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy
        self.state: LayerState | None = None
        self.seen = 0  # tokens appended so far = next token's position
        self.pending = False  # appended tokens whose attention has not been observed yet

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.pending:
            raise RuntimeError("attention hook did not run: was the model given to CompressedCache?")
        if self.state is None:
            self.lazy_initialization(key_states, value_states)
            self.state = LayerState.empty(key_states, value_states)
        q = key_states.shape[2]
        self.state.append(key_states, value_states, torch.arange(self.seen, self.seen + q, device=key_states.device))
        self.seen += q
        self.pending = True
        self.keys, self.values = self.state.keys, self.state.values
        return self.keys, self.values

    def after_attention(self, weights: Tensor | None) -> None:
        """Fold this step's attention (B, Hq, q, L) into the statistics, then compress."""
        if weights is not None:
            self.state.observe(weights)
        elif self.policy.needs_attention:
            raise UserError(f"{self.policy.name} needs attention weights: load the model with eager attention")
        self.policy.compress(self.state)
        self.keys, self.values = self.state.keys, self.state.values
        self.pending = False

    def reset(self) -> None:
        super().reset()
        self.state, self.seen, self.pending = None, 0, False

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise UserError("CompressedCache does not support beam search or num_return_sequences > 1")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise UserError("CompressedCache does not support beam search")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        # generate()'s beam search reorders each layer through this (not batch_select_indices);
        # the inherited version would reorder keys/values but not ``state``, silently mixing beams
        raise UserError("CompressedCache does not support beam search")


def _after_attention(module: nn.Module, args, kwargs, output) -> None:
    cache = kwargs.get("past_key_values")
    if isinstance(cache, CompressedCache):
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        cache.layers[module.layer_idx].after_attention(weights)


def install_hooks(model: nn.Module) -> None:
    """Register the post-attention hook once per model; it acts only for a CompressedCache."""
    if model in _HOOKED:
        return
    handles = [m.register_forward_hook(_after_attention, with_kwargs=True) for m in attention_modules(model).values()]
    _HOOKED[model] = handles


class CompressedCache(Cache):
    """Cache whose every layer is held to ``budget`` slots by ``method`` (see ``analysis.compress``)."""

    def __init__(
        self,
        model: nn.Module,
        method: str = "weightedkv",
        budget: int | None = 256,
        sinks: int = 4,
        recent: int | None = None,
        seed: int = 0,
        policy: Policy | None = None,
    ):
        self.policy = policy or make_policy(method, budget, sinks=sinks, recent=recent, seed=seed)
        super().__init__(layers=[CompressedLayer(self.policy) for _ in range(model.config.num_hidden_layers)])
        install_hooks(model)
        impl = model.config._attn_implementation
        if self.policy.needs_attention and impl not in _WEIGHT_IMPLS:
            warnings.warn(f"{self.policy.name} needs attention weights; switching the model from {impl} to eager")
            model.set_attn_implementation("eager")

    def occupancy(self) -> list[int]:
        """Slots held per layer."""
        return [layer.get_seq_length() for layer in self.layers]

    def kept_positions(self, layer: int) -> Tensor:
        """(B, H, L) original positions of the tokens layer ``layer`` still holds."""
        state = self.layers[layer].state
        return state.positions if state is not None else torch.empty(0, dtype=torch.long)
