"""Per-head budget plans from a head profile, and the baselines they are compared with.

Rule (``greedy_plan``): every head starts at the smallest profiled budget, or at the floor
(``Plan.floor()``: sinks + recent + 1, the least a head can hold) when the total cannot give every
head that much (so predictions below the profiled range are used only when nothing else fits);
then slots are handed out one at a time, each to the head whose predicted
error drops most from one more slot, until the total memory is spent. A head's predicted error at
budget b is its better method's teacher-forced error, min(weightedkv, weightedkv_evict), linear in
log2(b) between the profiled budgets, 0 at the profiled length (nothing is compressed there) and
extrapolated below the smallest budget with the first segment's slope (clamped to [0, 1]). With
curves that are convex in b this greedy water-filling minimises the summed predicted error. Each
head then merges (WeightedKV) where its profiled merge error is at most its evict error at the
budget it got, and evicts otherwise.

Baselines at the same total: ``uniform_plan`` (every head the same), ``layer_plan`` (pyramid-like,
linear from 1.5x the mean at layer 0 to 0.5x at the last layer, equal across a layer's heads) and
``random_plan`` (random positive weights per head, seeded). Every plan's total is at most the
request (exactly the request unless caps get in the way: a remainder is spread one slot per head, so
an integer ``--total-budget`` that does not divide still gives every baseline the plan's total)
and every head gets at least the floor.

On a model with sliding-window layers (Gemma 2/3) the profile covers the other layers only (those
``CompressedCache`` compresses); every plan shares the total among those layers' heads, and the
sliding layers' rows hold the window, outside the total (``Plan.sliding_layers``).

Controls that separate the plan's two choices: ``uniform-evict`` (uniform budgets, every head evicts:
the uniform baseline with the other method), and ``budgets-merge`` / ``budgets-evict`` (the plan's own
budgets, every head merging / evicting: how much comes from the allocation alone).
"""

from __future__ import annotations

import heapq
import math
import random

from analysis.errors import UserError
from analysis.heads.profile import EVICT, MERGE, curves
from analysis.jobs.plan import Plan

BASELINES = ("uniform", "layer", "random", "uniform-evict", "budgets-merge", "budgets-evict")


def parse_total(text: str | int, num_heads: int) -> int:
    """'128x' -> 128 slots per head on average (x heads); '11520' -> that many slots in all."""
    s = str(text).strip().lower()
    try:
        return int(float(s[:-1]) * num_heads) if s.endswith("x") else int(s)
    except ValueError:
        raise UserError(f"--total-budget expects slots like 11520 or a per-head mean like 128x, got {text!r}") from None


def floor_of(sinks: int = 4, recent: int | None = None) -> int:
    return Plan([[sinks + (recent or 0) + 1]], sinks, recent).floor()


def check_total(total: int, num_heads: int, floor: int) -> None:
    if total < floor * num_heads:
        raise UserError(f"--total-budget {total} is below the floor of all heads: {num_heads} heads x {floor} "
                        f"(sinks + recent + 1) = minimum {floor * num_heads} slots")


def _predict(points: list[tuple[int, float]], b: int) -> float:
    """Piecewise linear in log2(b) through ``points`` (sorted by budget); see the module docstring."""
    x = [math.log2(p) for p, _ in points]
    y = [e for _, e in points]
    lb = math.log2(b)
    if lb <= x[0]:
        slope = (y[1] - y[0]) / (x[1] - x[0]) if len(x) > 1 else 0.0
        return min(max(y[0] + slope * (lb - x[0]), 0.0), 1.0)
    if lb >= x[-1]:
        return y[-1]
    i = next(i for i in range(len(x) - 1) if x[i] <= lb <= x[i + 1])
    return y[i] + (y[i + 1] - y[i]) * (lb - x[i]) / (x[i + 1] - x[i])


def head_curves(profile: dict) -> tuple[list[list[list[tuple[int, float]]]], dict]:
    """Per head, [(budget, best error)] points ending at (profiled tokens, 0); and the per-method grids."""
    grids = {m: curves(profile, m) for m in (MERGE, EVICT)}
    L, H, T = len(profile["layers"]), profile["num_kv_heads"], profile["tokens"]
    pts = [[[(b, min(grids[MERGE][b][l][h], grids[EVICT][b][l][h])) for b in profile["budgets"]] + [(T, 0.0)]
            for h in range(H)] for l in range(L)]
    return pts, grids


def _shape(profile: dict, num_layers: int | None) -> tuple[int, int]:
    L = num_layers or profile.get("num_layers") or len(profile["layers"])
    sliding = profile.get("sliding_layers") or []
    if len(profile["layers"]) + len(sliding) != L:
        raise UserError(f"the profile covers {len(profile['layers'])} of {L} layers: a plan needs every layer profiled"
                        + (f" but the {len(sliding)} sliding-window ones" if sliding else ""))
    return len(profile["layers"]), profile["num_kv_heads"]


def with_sliding(plan: Plan, sliding: list[int], window: int | None) -> Plan:
    """``plan`` over the compressed layers only, with the sliding layers' rows (the window) put back in place."""
    if not sliding:
        return plan
    rows, merges = iter(plan.budgets), iter(plan.merge or [])
    H = plan.num_kv_heads
    L = plan.num_layers + len(sliding)
    held = window or plan.max_budget  # what the model's own sliding cache holds; not a budget
    budgets = [[held] * H if i in sliding else next(rows) for i in range(L)]
    merge = None if plan.merge is None else [[False] * H if i in sliding else next(merges) for i in range(L)]
    return Plan(budgets, plan.sinks, plan.recent, merge=merge, name=plan.name, model=plan.model,
                sliding_layers=sorted(sliding))


def _compressed_only(plan: Plan) -> Plan:
    """The rows of ``plan``'s compressed layers, as a plan of its own."""
    keep = [i for i in range(plan.num_layers) if i not in plan.sliding_layers]
    merge = None if plan.merge is None else [plan.merge[i] for i in keep]
    return Plan([plan.budgets[i] for i in keep], plan.sinks, plan.recent, merge=merge, name=plan.name,
                model=plan.model)


def greedy_plan(profile: dict, total: int, sinks: int = 4, recent: int | None = None, max_budget: int | None = None,
                name: str = "greedy", model: str | None = None) -> Plan:
    """Water-filling on the predicted error curves (module docstring); ``max_budget`` caps a head."""
    L, H = _shape(profile, None)
    floor = floor_of(sinks, recent)
    check_total(total, L * H, floor)
    cap = max_budget or profile["tokens"] - 1
    if cap < floor:
        raise UserError(f"--max-budget {cap} is below the floor {floor} (sinks + recent + 1)")
    start = min(profile["budgets"]) if min(profile["budgets"]) * L * H <= total else floor
    start = min(max(start, floor), cap)
    pts, grids = head_curves(profile)
    budgets = [[start] * H for _ in range(L)]
    heap = [(-(_predict(pts[l][h], start) - _predict(pts[l][h], start + 1)), l, h) for l in range(L) for h in range(H)]
    heapq.heapify(heap)
    left = total - start * L * H
    while left > 0 and heap:
        _, l, h = heapq.heappop(heap)
        budgets[l][h] += 1
        left -= 1
        b = budgets[l][h]
        if b < cap:
            heapq.heappush(heap, (-(_predict(pts[l][h], b) - _predict(pts[l][h], b + 1)), l, h))
    merge = [[_predict(_points(grids[MERGE], profile, l, h), budgets[l][h])
              <= _predict(_points(grids[EVICT], profile, l, h), budgets[l][h]) for h in range(H)] for l in range(L)]
    return with_sliding(Plan(budgets, sinks, recent, merge=merge, name=name, model=model),
                        profile.get("sliding_layers") or [], profile.get("sliding_window"))


def _points(grid: dict, profile: dict, l: int, h: int) -> list[tuple[int, float]]:
    return [(b, grid[b][l][h]) for b in profile["budgets"]] + [(profile["tokens"], 0.0)]


def _spread(flat: list[int], extra: int, cap: int) -> list[int]:
    """Add ``extra`` slots one per head, to heads spread evenly over the flat (layer, head) order, below ``cap``."""
    out = list(flat)
    while extra > 0:
        room = [i for i, b in enumerate(out) if b < cap]
        if not room:
            break
        take = min(extra, len(room))
        for k in range(take):  # evenly spaced among the heads with room: layer 0's first head first
            out[room[k * len(room) // take]] += 1
        extra -= take
    return out


def _fit(weights: list[float], total: int, floor: int, cap: int) -> list[int]:
    """Integers >= floor, <= cap, summing to at most ``total``, proportional to ``weights`` above the floor."""
    n = len(weights)
    check_total(total, n, floor)
    spare = min(total - floor * n, (cap - floor) * n)
    s = sum(weights)
    raw = [spare * w / s for w in weights]
    out = [min(floor + int(r), cap) for r in raw]
    order = sorted(range(n), key=lambda i: -(raw[i] - int(raw[i])))
    left = floor * n + spare - sum(out)
    for i in order * 2:  # largest remainders first; a second pass when caps got in the way
        if left <= 0:
            break
        if out[i] < cap:
            out[i] += 1
            left -= 1
    return _spread(out, left, cap)  # what caps still held back: evenly over the heads with room


def _rows(flat: list[int], num_kv_heads: int) -> list[list[int]]:
    return [flat[i:i + num_kv_heads] for i in range(0, len(flat), num_kv_heads)]


def uniform_plan(num_layers: int, num_kv_heads: int, total: int, sinks: int = 4, recent: int | None = None,
                 model: str | None = None) -> Plan:
    """Every head ``total // heads`` slots, and the remainder one each to heads spread evenly: exactly ``total``."""
    n = num_layers * num_kv_heads
    check_total(total, n, floor_of(sinks, recent))
    if total % n == 0:
        return Plan.uniform(num_layers, num_kv_heads, total // n, sinks, recent, name="uniform", model=model)
    flat = _spread([total // n] * n, total % n, total)
    return Plan(_rows(flat, num_kv_heads), sinks, recent, name="uniform", model=model)


def layer_plan(num_layers: int, num_kv_heads: int, total: int, sinks: int = 4, recent: int | None = None,
               cap: int | None = None, model: str | None = None) -> Plan:
    """Pyramid-like: layer l's heads all get ~ mean x (1.5 - l / (L - 1)); early layers more.

    A layer's heads are equal but for the remainder of ``total`` over the heads, spread one slot each.
    """
    floor = floor_of(sinks, recent)
    check_total(total, num_layers * num_kv_heads, floor)
    cap = cap or total
    weights = [1.5 - (l / (num_layers - 1) if num_layers > 1 else 0.5) for l in range(num_layers)]
    per_layer = _fit(weights, total // num_kv_heads, floor, cap)
    flat = [b for b in per_layer for _ in range(num_kv_heads)]
    flat = _spread(flat, total - sum(flat), cap)
    return Plan(_rows(flat, num_kv_heads), sinks, recent, name="layer", model=model)


def random_plan(num_layers: int, num_kv_heads: int, total: int, sinks: int = 4, recent: int | None = None,
                cap: int | None = None, seed: int = 0, model: str | None = None) -> Plan:
    """Random per-head weights uniform in [0.5, 1.5] (seeded), budgets proportional above the floor."""
    rng = random.Random(seed)
    n = num_layers * num_kv_heads
    flat = _fit([rng.uniform(0.5, 1.5) for _ in range(n)], total, floor_of(sinks, recent), cap or total)
    return Plan(_rows(flat, num_kv_heads), sinks, recent, name="random", model=model)


def baseline(name: str, like: Plan, total: int | None = None, cap: int | None = None, seed: int = 0) -> Plan:
    """The baseline ``name`` shaped like ``like`` at its total memory (or ``total``)."""
    if like.sliding_layers:  # shared among the compressed layers only; the sliding rows as in ``like``
        window = like.budgets[like.sliding_layers[0]][0]
        return with_sliding(baseline(name, _compressed_only(like), total, cap, seed), like.sliding_layers, window)
    total = like.total_slots if total is None else total
    args = (like.num_layers, like.num_kv_heads, total, like.sinks, like.recent)
    if name == "uniform":
        return uniform_plan(*args, model=like.model)
    if name == "layer":
        return layer_plan(*args, cap=cap, model=like.model)
    if name == "random":
        return random_plan(*args, cap=cap, seed=seed, model=like.model)
    if name in ("uniform-evict", "budgets-merge", "budgets-evict"):
        shape = uniform_plan(*args, model=like.model) if name == "uniform-evict" else like
        merge = name.endswith("-merge")
        return Plan(shape.budgets, shape.sinks, shape.recent, merge=[[merge] * len(r) for r in shape.budgets],
                    name=name, model=like.model)
    raise UserError(f"unknown baseline {name!r}: choose from {', '.join(BASELINES)}")
