"""How the benchmarks measure: a timed call, medians of interleaved repeats, decode-step timers, a fresh process.

Interleaving (every timer once per repeat, in turn) makes slow drift on a shared machine hit every
timer alike; the median drops the odd slow repeat.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache

from analysis.runtime.cache import CompressedCache


def timed(fn) -> tuple[float, object]:
    """Seconds that ``fn()`` took, and what it returned."""
    began = time.perf_counter()
    out = fn()
    return time.perf_counter() - began, out


def median_ms(fn, repeats: int) -> float:
    """Median of ``repeats`` calls of ``fn()`` (seconds each), in ms."""
    return statistics.median(fn() for _ in range(repeats)) * 1000


def interleaved_medians(timers: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Each timer called once per repeat, in turn; the median of what each returned."""
    times: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(repeats):
        for k, fn in timers.items():
            times[k].append(fn())
    return {k: statistics.median(v) for k, v in times.items()}


def decode_timer(model, method, budget, length, batch, steps, device):
    """Return a function that prefills ``length`` tokens, then times ``steps`` single-token steps."""

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length + steps + 2), generator=torch.Generator().manual_seed(0)).to(device)

    def run(around_steps=contextlib.nullcontext) -> float:
        cache = CompressedCache(model, method, budget)
        try:
            return _timed(cache, around_steps)
        finally:
            close = getattr(cache, "close", None)  # (older commits had no close)
            if close:
                close()

    def _timed(cache, around_steps) -> float:
        with torch.inference_mode():
            for start in range(0, length, 256):  # chunks: same state, bounded attention memory
                stop = min(start + 256, length)
                positions = torch.arange(start, stop, device=device).expand(batch, -1)
                model(ids[:, start:stop], past_key_values=cache, position_ids=positions)
            model(ids[:, length : length + 1], past_key_values=cache,
                  position_ids=torch.full((batch, 1), length, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            with around_steps():
                for t in range(length + 1, length + 1 + steps):
                    model(ids[:, t : t + 1], past_key_values=cache,
                          position_ids=torch.full((batch, 1), t, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - began) / steps

    return run


def cropped_step(model, ids, m: int, steps: int) -> float:
    """Seconds per plain decode step: a DynamicCache prefilled with ``ids[:, :m]``, cropped back to m slots
    after each step, so every one of ``steps`` steps attends over m + 1 slots (under the model's attention)."""
    batch, device = ids.shape[0], ids.device
    cache = DynamicCache()
    with torch.inference_mode():
        model(ids[:, :m], past_key_values=cache, position_ids=torch.arange(m, device=device).expand(batch, m))
        began = time.perf_counter()
        for t in range(m, m + steps):
            model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((batch, 1), t, device=device))
            cache.crop(-1)
    return (time.perf_counter() - began) / steps


def in_fresh_process(code: str, *args) -> list[float]:
    """Run ``python -c code args...`` in a fresh process (its peak RSS is its own); the numbers on the
    last line it prints."""
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.strip().splitlines()[-1].split()]
