"""A transformers ``Cache`` that runs a compression policy inside ``generate()`` and ``forward``.

    with CompressedCache(model, method="weightedkv", budget=256) as cache:
        model.generate(ids, past_key_values=cache, max_new_tokens=100)

Each step a layer writes the new keys/values into free slots of its ``LayerState`` (``update``,
called by the model before attention); kvlens's attention function (``analysis.runtime.kernel``) attends
over the valid slots with a mask built from their positions, so the overflowing step sees m + 1
slots as in Algorithm 1; it then hands the softmax weights to the layer, which updates its
statistics and lets the policy shrink every head back to its budget.

Side effects on the model, and how to undo them: building a cache registers two forward hooks on
every attention module (they act only for a ``CompressedCache``) and switches the model's attention
implementation to ``"kvlens"`` (eager arithmetic that returns weights). ``cache.close()``, or leaving
the ``with`` block, removes the hooks and restores the previous implementation once the last open
cache of that model is closed; so does dropping the last reference to the cache. ``restore(model)``
undoes everything at once.

Keys are cached post-RoPE with their original positions (``generate`` passes explicit
``position_ids``), so nothing is re-rotated after eviction. ``get_seq_length()`` is the number of
tokens the cache has seen, so a second ``generate()`` on the same cache continues the conversation.
Sliding-window layers (Gemma 2/3, hybrid models) keep the model's own sliding cache: their window
already bounds them, and compressing inside it would change what the model was trained to see.
Batches must be unpadded (equal-length rows).
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, fields
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from analysis.compress import LayerState, Policy, PolicyOptions
from analysis.errors import UserError
from analysis.jobs import Job, LowRank
from analysis.models.loading import attention_modules, sliding_layers
from analysis.runtime import kernel as attention
from analysis.runtime.channels import LayerCodec

_OPEN: "WeakKeyDictionary[nn.Module, dict]" = WeakKeyDictionary()  # model -> hooks, previous impl, open caches


class CompressedLayer(DynamicLayer):
    """One layer's cache: a fixed-capacity ``LayerState`` kept within its budgets by the shared ``Policy``."""

    is_croppable = False

    def __init__(self, policy: Policy, layer_idx: int, budgets: list | None = None,
                 merge: list | None = None, recent: list | None = None,
                 row_ids: Tensor | None = None, row_budgets: Tensor | None = None, track_mixing: int = 0,
                 codec: LayerCodec | None = None):
        super().__init__()
        self.codec = codec  # keys/values held as low-rank coefficients (analysis.runtime.channels)
        self.policy, self.layer_idx = policy, layer_idx
        # per KV head, from a plan: (H) lists for every row, or (B, H) lists of nested ints for a plan per row
        self.budgets, self.merge, self.recent = _per_row(budgets), _per_row(merge), _per_row(recent)
        self.row_ids, self.row_budgets, self.track_mixing = row_ids, row_budgets, track_mixing
        self.state: LayerState | None = None
        self.pending = False  # appended tokens whose attention has not been seen yet
        self.held = False  # a shared prefill: observe only; ``fan_out`` copies the rows, then compresses

    def _start(self, key_states: Tensor, value_states: Tensor) -> None:
        self.lazy_initialization(key_states, value_states)
        device = key_states.device
        # once per layer, host to device: the per-step path then never copies or reads them back
        row_ids = self.row_ids.to(device) if self.row_ids is not None else None
        state = LayerState.empty(key_states, value_states, 0, stats=self.policy.stats, layer=self.layer_idx,
                                 row_ids=row_ids, track_mixing=self.track_mixing)
        if self.row_budgets is not None:  # (B, 1) on the host: one budget per row (a sweep's jobs side by side)
            state.budget = self.row_budgets.to(device).expand(-1, key_states.shape[1])
            state.budget_range = (int(self.row_budgets.min()), int(self.row_budgets.max()))
        elif self.budgets is not None:
            state.budget = torch.tensor(self.budgets, device=device)  # (1 or B, H)
            flat = [b for row in self.budgets for b in row]
            state.budget_range = (min(flat), max(flat))  # known on the host: no device read
        if self.merge is not None:
            state.merge_mask = torch.tensor(self.merge, device=device)  # (1 or B, H)
        if self.recent is not None:
            state.recent = torch.tensor(self.recent, device=device)[..., None]  # (1 or B, H, 1)
        high = state.budget_range[1] if state.budget_range else self.policy.budget
        if self.policy.compresses and high:
            state._grow(high + 1)  # the overflowing step attends over budget + 1 slots
        self.state = state

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.pending:
            raise RuntimeError("the attention of the previous step never reached the cache: was the model's "
                               "attention implementation changed after the CompressedCache was built?")
        if self.codec is not None:  # the slots hold coefficients; attention gets reconstructed post-RoPE keys
            seen = self.state.seen if self.state is not None else 0
            key_states, value_states = self.codec.encode(key_states, value_states, seen)
        if self.state is None:
            self._start(key_states, value_states)
        self.state.append(key_states, value_states)
        # the reference keeps dense, ordered slots that any attention implementation reads correctly
        self.pending = self.policy.compresses
        self.keys, self.values = self.state.keys, self.state.values
        if self.codec is not None:
            return self.codec.decode(self.keys, self.values, self.state.positions)
        return self.keys, self.values

    def after_attention(self, weights: Tensor | None) -> None:
        """Fold this step's attention (B, Hq, q, C) into the statistics, then compress."""
        state = self.state
        if weights is not None:
            state.observe(weights)
        elif self.policy.needs_attention:
            raise UserError(f"{self.policy.name} needs attention weights, which this model's attention did not return")
        self.pending = False
        if self.held:  # nothing later in this forward reads this layer's cache: compressing can wait
            self.keys, self.values = state.keys, state.values
            return
        self._compress()

    def _compress(self) -> None:
        state = self.state
        self.policy.compress(state)
        high = state.budget_range[1] if state.budget_range else self.policy.budget
        if self.policy.compresses and state.capacity > high + 1:
            state.compact(high + 1)  # after a long prompt: one copy gives the memory back
        self.keys, self.values = state.keys, state.values

    def fan_out(self, index: Tensor) -> None:
        """After a held prefill of U prompts, row r becomes prompt ``index[r]``'s, compressed by row r's policy."""
        if self.state is not None:
            self.state.take_rows(index.to(self.state.positions.device))
            self.held = False
            self._compress()

    def get_seq_length(self) -> int:
        """Tokens seen so far (transformers reads it as the next token's position)."""
        return self.state.seen if self.state is not None else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # kvlens's attention builds this layer's mask from slot positions; this only sizes the unused one
        return (self.state.capacity if self.state is not None else 0) + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.state, self.pending = None, False

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise UserError("CompressedCache does not support beam search or num_return_sequences > 1")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise UserError("CompressedCache does not support beam search")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        # generate()'s beam search reorders each layer through this; the inherited version would
        # reorder keys/values but not ``state``, silently mixing beams
        raise UserError("CompressedCache does not support beam search")


def _bind(module: nn.Module, args, kwargs) -> None:
    cache = kwargs.get("past_key_values")
    layer = cache.layers[module.layer_idx] if isinstance(cache, CompressedCache) else None
    attention.bind(module, layer if isinstance(layer, CompressedLayer) else None)


def _unbind(module: nn.Module, args, kwargs, output) -> None:
    attention.bind(module, None)
    cache = kwargs.get("past_key_values")
    if isinstance(cache, CompressedCache):
        layer = cache.layers[module.layer_idx]
        if isinstance(layer, CompressedLayer) and layer.pending:
            impl = getattr(getattr(module, "config", None), "_attn_implementation", "?")
            raise UserError(f"the model's attention is {impl!r}, not kvlens's: CompressedCache needs the "
                            "implementation it set (was it changed after the cache was built?)")


def _open(model: nn.Module) -> None:
    """Hooks and the attention implementation, once per model however many caches are open."""
    entry = _OPEN.get(model)
    if entry is None:
        modules = attention_modules(model).values()
        handles = [m.register_forward_pre_hook(_bind, with_kwargs=True) for m in modules]
        handles += [m.register_forward_hook(_unbind, with_kwargs=True) for m in modules]
        previous = model.config._attn_implementation
        if previous not in ("eager", attention.NAME):
            warnings.warn(f"CompressedCache needs attention weights: the model runs kvlens's eager attention "
                          f"instead of {previous} until the cache is closed", stacklevel=3)
        model.set_attn_implementation(attention.register())
        entry = _OPEN[model] = {"handles": handles, "previous": previous, "open": 0}
    entry["open"] += 1


def _close(model: nn.Module) -> None:
    entry = _OPEN.get(model)
    if entry is None:
        return
    entry["open"] -= 1
    if entry["open"] <= 0:
        for handle in entry["handles"]:
            handle.remove()
        model.set_attn_implementation(entry["previous"])
        del _OPEN[model]


def restore(model: nn.Module) -> None:
    """Undo every CompressedCache's side effects on ``model`` (hooks, attention implementation)."""
    entry = _OPEN.get(model)
    if entry is not None:
        entry["open"] = 0
        _close(model)


def _held(layer) -> int:
    """Tokens a layer of the model's own cache holds (a sliding layer: its window, not every token seen)."""
    keys = getattr(layer, "keys", None)
    return int(keys.shape[-2]) if isinstance(keys, Tensor) and keys.dim() == 4 else layer.get_seq_length()


def _per_row(values: list | None) -> list[list] | None:
    """A plan row (H,) as the (1, H) it broadcasts to; (B, H) lists (a plan per batch row) as they are."""
    if values is None:
        return None
    return [list(r) for r in values] if values and isinstance(values[0], (list, tuple)) else [list(values)]


@dataclass(frozen=True)
class Rows:
    """What tells a batch's rows apart: ``ids`` (B,) seed each row's random draws (its window index),
    ``budgets`` (B,) give each row its own budget (a sweep's jobs side by side, ``RowPolicies``),
    ``plans`` (B,) give each row its own per-head plan (a head study's plans side by side)."""

    ids: Tensor | None = None
    budgets: list[int] | None = None
    plans: list | None = None


def _row_plans(plan, rows: Rows) -> list | None:
    """The plans to check and to lay out: ``[plan]`` for every row, or one per row (``rows.plans``)."""
    if rows.plans is None:
        return None if plan is None else [plan]
    if plan is not None or rows.budgets is not None:
        raise UserError("give a plan for every row (plan=) or one per row (Rows.plans), not with per-row budgets")
    if not rows.plans:
        raise UserError("Rows.plans is empty: give one plan per batch row")
    if len({(p.sinks, p.recent) for p in rows.plans}) > 1:
        raise UserError("plans packed as rows must share sinks and recent (each row's policy takes them)")
    return list(rows.plans)


def _plan_rows(plans: list | None, shared: bool, layer: int) -> tuple:
    """Layer ``layer``'s (budgets, merge, recent) per KV head: (H) lists for a shared plan, (B, H) for one per row."""
    if plans is None:
        return None, None, None
    if shared:
        plan = plans[0]
        return plan.budgets[layer], plan.merge_row(layer), plan.recent_row(layer)
    heads = plans[0].num_kv_heads
    merge = ([p.merge_row(layer) or [True] * heads for p in plans]  # no merge flags: every head merges
             if any(p.merge is not None for p in plans) else None)
    return [p.budgets[layer] for p in plans], merge, [p.recent_row(layer) for p in plans]


def _policy(method: str | Policy | Job, budget: int | None, plan, options: dict) -> Policy:
    """The cache's policy: a ``Job``'s or a ``Policy`` as given; a method name is built once, by ``Job.of``."""
    if isinstance(method, Job):
        return method.policy
    if isinstance(method, Policy):
        if options:
            raise UserError(f"options {sorted(options)} configure a method name; this policy is already built")
        return method
    valid = [f.name for f in fields(PolicyOptions)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(f"unknown CompressedCache option(s) {unknown}; valid: {', '.join(valid)}")
    return Job.of(method, budget, PolicyOptions(**options), plan).policy


class CompressedCache(Cache):
    """Cache whose every full-attention layer is held to ``budget`` slots (or a plan's) by a policy.

    ``method``: a registered name (built once, by ``Job.of``, with ``**options``: ``sinks``, ``recent``,
    ``seed``), a configured ``Policy``, or a ``Job`` (which brings its plan and low-rank channels);
    ``plan``: an ``analysis.jobs.plan.Plan`` giving each (layer, KV head) its budget and, optionally,
    merge-or-evict; ``rows``: per-row seeds, budgets or plans (``Rows``); ``track_mixing`` > 0 records
    which original tokens each slot's value mixes (for display). ``key_basis`` (a basis directory or
    ``analysis.jobs.basis.Basis``) with ``key_rank`` R (or ``key_energy``) holds every key as R
    coefficients of its pre-RoPE projection; ``lowrank`` (a ``LowRank``) also sets low-rank values.
    Composes with every method: the policy sees slots as before.
    """

    def __init__(self, model: nn.Module, method: str | Policy | Job = "weightedkv", budget: int | None = 256, *,
                 plan=None, rows: Rows | None = None, track_mixing: int = 0, key_basis=None,
                 key_rank: int | None = None, key_energy: float | None = None, lowrank: LowRank | None = None,
                 **options):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if key_basis is not None or key_rank is not None or key_energy is not None:
            if lowrank is not None:
                raise UserError("give key_basis/key_rank or lowrank, not both")
            lowrank = LowRank.of(key_basis, key_rank, key_energy)
        rows = rows or Rows()
        if isinstance(method, Job):
            if plan is not None or lowrank is not None or options:
                raise UserError("a Job carries its own plan, low-rank channels and options: give none of them")
            plan, lowrank = method.plan, method.lowrank
        plans = _row_plans(plan, rows)
        for one in plans or ():
            one.check(config)
        self.policy = _policy(method, budget, max(plans, key=lambda p: p.max_budget) if plans else None, options)
        for one in plans or ():
            one.check_policy(self.policy)
        if lowrank is not None:
            lowrank.basis.check(model)
        self.lowrank = lowrank
        sliding = sliding_layers(config)
        row_budgets = torch.tensor(rows.budgets)[:, None] if rows.budgets is not None else None
        layers = []
        for i in range(config.num_hidden_layers):
            if i in sliding:
                layers.append(DynamicSlidingWindowLayer(sliding_window=config.sliding_window))
                continue
            layers.append(CompressedLayer(self.policy, i, *_plan_rows(plans, rows.plans is None, i), row_ids=rows.ids,
                                          row_budgets=row_budgets, track_mixing=track_mixing,
                                          codec=self._codec(model, i)))
        super().__init__(layers=layers)
        self._model = model
        if self.policy.compresses:  # the reference needs no hook or switch: see CompressedLayer.update
            _open(model)
            self._release = weakref.finalize(self, _close, model)  # also when the cache is dropped
            self._release.atexit = False  # not during interpreter shutdown

    def _codec(self, model: nn.Module, layer: int) -> LayerCodec | None:
        if self.lowrank is None:
            return None
        codec = LayerCodec(model, layer, self.lowrank)
        return codec if codec.active else None

    def hold(self) -> None:
        """The next forward feeds U distinct prompts for R >= U rows (``fan_out``): observe, do not compress."""
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.held = True

    def fan_out(self, index: Tensor) -> None:
        """Row r becomes prompt ``index[r]`` (R,) of the held prefill, compressed by row r's policy: one forward
        per prompt however many methods share it (a prefill compresses after its attention: nothing changes)."""
        index = index.to(torch.long)
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                layer.fan_out(index)
            elif isinstance(getattr(layer, "keys", None), Tensor):  # a sliding layer: the model's own cache
                layer.keys = layer.keys.index_select(0, index.to(layer.keys.device))
                layer.values = layer.values.index_select(0, index.to(layer.values.device))

    def close(self) -> None:
        """Remove the hooks and restore the model's attention implementation (once no cache is open)."""
        release = getattr(self, "_release", None)
        if release is not None:
            release()

    def __enter__(self) -> "CompressedCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _compressed(self) -> list[tuple[int, LayerState]]:
        return [(i, layer.state) for i, layer in enumerate(self.layers)
                if isinstance(layer, CompressedLayer) and layer.state is not None]

    def occupancy(self) -> list[int]:
        """Tokens held per layer (the most any (row, head) holds)."""
        held = dict((i, int(state.n_valid().max())) for i, state in self._compressed())
        return [held.get(i, _held(layer) if not isinstance(layer, CompressedLayer) else 0)
                for i, layer in enumerate(self.layers)]

    def kept_positions(self, layer: int) -> Tensor:
        """(B, H, C) original positions layer ``layer`` holds, ascending; free slots (-1) last."""
        state = getattr(self.layers[layer], "state", None)
        if state is None:
            return torch.empty(0, dtype=torch.long)
        key = torch.where(state.valid, state.positions, torch.iinfo(torch.long).max)
        return state.positions.gather(2, key.argsort(dim=-1))

    def memory(self) -> dict:
        """The compressed layers' cache in bytes, two ways, and in slots.

        ``logical_bytes``: what a ragged store holds, per (row, KV head) min(budget, tokens seen) slots
        of (key width + value width) x element size, a low-rank head's widths being its ranks.
        ``physical_bytes``: the tensors' real sizes (capacity slots, zero-padded ranks); ``basis_bytes``:
        the projection matrices, shared by every row; ``slots``: the held slots summed over rows and heads.
        """
        logical = physical = slots = basis = 0
        for i, state in self._compressed():
            H = state.positions.shape[1]
            codec = self.layers[i].codec
            if codec is not None:
                key_width, value_width = codec.widths(state.keys.shape[-1], state.values.shape[-1])
                basis += codec.basis_bytes()
            else:
                key_width, value_width = (torch.full((H,), t.shape[-1]) for t in (state.keys, state.values))
            budget = state.budget if state.budget is not None else torch.tensor(self.policy.budget or state.capacity)
            held = torch.minimum(budget.expand(state.positions.shape[:2]), torch.tensor(state.seen)).cpu()  # (B, H)
            logical += int((held * (key_width + value_width)[None, :]).sum()) * state.keys.element_size()
            slots += int(held.sum())
            physical += (state.keys.numel() * state.keys.element_size()
                         + state.values.numel() * state.values.element_size())
        return {"logical_bytes": logical, "physical_bytes": physical, "basis_bytes": basis, "slots": slots}
