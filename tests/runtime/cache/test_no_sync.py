"""The per-step path never synchronises with the host, checked without a GPU, for every method.

On CPU a device-to-host copy is a no-op, so spying on ``Tensor.item`` and friends cannot see a
running hash that hops between devices. Here the tiny model and every cache tensor live on the
``meta`` device (shapes, no data) and a ``TorchDispatchMode`` watches every aten call of a decode
step. Any of these is a defect on a real accelerator:

- a host read (``_local_scalar_dense`` and the ops that return a Python value);
- a data-dependent output shape (``nonzero``, ``masked_select``, ``unique``, boolean indexing, ..);
- any tensor that is not on the model's device: a Python int turned into a CPU tensor, a CPU
  tensor copied in (host-to-device), a device tensor copied out. On meta a copy out even raises.

A Python scalar operand does not count: it reaches the kernel as a value, not as a tensor.
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM

from analysis.compress import METHODS, RowPolicies, make_policy
from analysis.jobs.plan import Plan
from analysis.runtime.cache import CompressedCache, Rows
from tests.conftest import tiny_config

aten = torch.ops.aten
DEVICE = torch.device("meta")
HOST_READS = {aten._local_scalar_dense, aten.item, aten.equal, aten.is_nonzero, aten.allclose, aten.is_same_size}
DYNAMIC_SHAPES = {aten.nonzero, aten.argwhere, aten.masked_select, aten.unique_consecutive, aten.unique_dim,
                  aten._unique, aten._unique2, aten.nonzero_numpy}
BUDGET, SINKS = 16, 4


class HostSyncs(TorchDispatchMode):
    """Records every aten call that would wait for, or copy through, the host; ``found`` lists them."""

    def __init__(self, device: torch.device = DEVICE):
        super().__init__()
        self.device, self.found = device, []

    def _why(self, func, args, kwargs, out) -> str | None:
        packet = func.overloadpacket
        if packet in HOST_READS:
            return "host read"
        if packet in DYNAMIC_SHAPES:
            return "data-dependent shape"
        if packet is aten.repeat_interleave and kwargs.get("output_size") is None and isinstance(args[0], Tensor):
            return "data-dependent shape"
        if packet in (aten.index, aten.index_put, aten.index_put_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", [])
            if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices):
                return "boolean indexing (data-dependent shape)"
        devices = {t.device for t in tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)}
        if devices - {self.device}:
            return f"tensor on {sorted(str(d) for d in devices)}"
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = self._why(func, args, kwargs, None)  # before running: some of these raise on meta
        if why is not None:
            self.found.append(f"{func} ({why}) at {_caller()}")
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        why = self._why(func, args, kwargs, out)
        if why is not None:
            self.found.append(f"{func} ({why}) at {_caller()}")
        return out


def _caller() -> str:
    """The innermost kvlens line on the stack: where the defect is."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/analysis/" in frame.filename:
            return f"{frame.filename.split('/analysis/')[-1]}:{frame.lineno}"
    return "?"


@pytest.fixture(scope="module")
def meta_llama():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="eager").eval()
    return model.to(DEVICE)


def forward(model, cache, start: int, length: int, batch: int) -> None:
    ids = torch.zeros((batch, length), dtype=torch.long, device=DEVICE)
    positions = torch.arange(start, start + length, device=DEVICE).expand(batch, length)
    with torch.no_grad():
        model(ids, past_key_values=cache, position_ids=positions, use_cache=True)


def syncs_in_decode(model, cache, prompt: int, steps: int, batch: int) -> list[str]:
    """Feed a ``prompt``-token prefill unwatched, then watch ``steps`` decode steps; what they did."""
    forward(model, cache, 0, prompt, batch)
    watch = HostSyncs()
    try:
        with watch:
            for t in range(prompt, prompt + steps):
                forward(model, cache, t, 1, batch)
    except Exception as error:  # noqa: BLE001 - a copy out of meta raises: report what led to it
        watch.found.append(f"raised {type(error).__name__}: {error}")
    return watch.found


def cases():
    """Every registered method alone, a plan (per-head budgets, merge mask, recent), and packed rows."""
    for name in METHODS:
        yield pytest.param(name, id=name)
    yield pytest.param("plan", id="weightedkv-plan")
    yield pytest.param("rows", id="rows-of-every-method")
    yield pytest.param("plan-rows", id="a-plan-per-row")


def make_cache(model, case: str, batch: int) -> CompressedCache:
    ids = torch.tensor([7, 3, 11, 5][:batch])  # window ids, given on the host as the evaluator does
    if case == "plan":
        plan = Plan([[12, 16], [16, 9], [10, 10], [14, 16]], sinks=2, merge=[[True, False]] * 4)
        return CompressedCache(model, "weightedkv", plan=plan, rows=Rows(ids=ids))
    if case == "plan-rows":
        plans = [Plan([[12, 16], [16, 9], [10, 10], [14, 16]], sinks=2, merge=[[True, False]] * 4),
                 Plan.uniform(4, 2, 13, sinks=2)]
        return CompressedCache(model, "weightedkv", rows=Rows(ids=ids, plans=plans))
    if case == "rows":
        names = [n for n, cls in METHODS.items() if cls.compresses]
        policies = [make_policy(n, BUDGET, SINKS) for n in names]
        batch_rows = list(range(len(names)))
        return CompressedCache(model, RowPolicies(policies=policies, rows=batch_rows),
                               rows=Rows(ids=torch.arange(len(names)), budgets=[BUDGET] * len(names)))
    return CompressedCache(model, case, BUDGET, sinks=SINKS, rows=Rows(ids=ids))


@pytest.mark.parametrize("case", list(cases()))
def test_decode_steps_never_touch_the_host(meta_llama, case):
    """Prompt below the budget, then steps that fill the cache and evict one slot each (static shapes)."""
    batch = sum(1 for cls in METHODS.values() if cls.compresses) if case == "rows" else 2
    with make_cache(meta_llama, case, batch) as cache:
        found = syncs_in_decode(meta_llama, cache, prompt=BUDGET - 2, steps=6, batch=batch)
    assert found == [], f"{case}: {len(found)} host syncs in decode steps, first: " + "\n".join(found[:5])


@pytest.mark.parametrize("method", [n for n, cls in METHODS.items() if cls.compresses])
def test_the_long_prompt_pass_never_touches_the_host(meta_llama, method):
    """A prompt far over the budget is compressed in one ranked pass: no host read there either."""
    with CompressedCache(meta_llama, method, BUDGET, sinks=SINKS) as cache:
        watch = HostSyncs()
        try:
            with watch:
                forward(meta_llama, cache, 0, 40, 2)
        except Exception as error:  # noqa: BLE001
            watch.found.append(f"raised {type(error).__name__}: {error}")
    assert watch.found == [], f"{method}: " + "\n".join(watch.found[:5])


def test_the_check_sees_each_kind_of_sync():
    """The detector itself: each defect it exists for is reported, legal code is not."""
    x = torch.zeros((2, 3), device=DEVICE)
    cases = {
        "host read": lambda: x.sum().item(),
        "data-dependent shape": lambda: (x > 0).nonzero(),
        "boolean indexing": lambda: x[x > 0],
        "tensor on": lambda: x + torch.as_tensor(3).to(DEVICE),  # a Python int made a CPU tensor, copied in
    }
    for expected, run in cases.items():
        watch = HostSyncs()
        try:
            with watch:
                run()
        except Exception:  # noqa: BLE001 - meta refuses some of them after they were recorded
            pass
        assert watch.found and expected in watch.found[0], (expected, watch.found)
    watch = HostSyncs()
    with watch:
        _ = (x * 3 + 1).argmin(-1), torch.arange(3, device=DEVICE) < 2, torch.where(x > 0, x, 0.5)
    assert watch.found == []
