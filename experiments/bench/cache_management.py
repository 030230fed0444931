"""The cache management alone (``experiments.bench.compress`` cache; results in docs/benchmarks.md).

One layer's append + observe + compress per decode step, without the model: synthetic tensors of the
model's geometry. Uses only the API every commit has, so ``PYTHONPATH=<older tree>`` measures an older
core with the same script.
"""

from __future__ import annotations

import time

import torch

from analysis.compress import LayerState, make_policy
from analysis.options import parse_names
from experiments.bench.measure import interleaved_medians


def bench_cache(loaded, args) -> None:
    """Each method's ms per layer-step and per model step (x layers), against streaming_llm's."""

    s = loaded.summary()
    H, G, D, B, m = s["num_kv_heads"], s["num_heads"] // s["num_kv_heads"], s["head_dim"], args.batch, args.budget
    print(f"\n### Cache management per layer and decode step, batch {B}, m={m} (ms; x {s['num_layers']} layers)\n")
    print("| method | ms per layer-step | ms per model step | vs streaming_llm |\n|---|---|---|---|")
    methods = parse_names(args.methods) if args.methods else ["weightedkv", "streaming_llm", "h2o", "cam"]
    timers = {method: lambda method=method: _cache_ms(method, B, H, G, D, m, args.steps * 10) for method in methods}
    med = interleaved_medians(timers, args.repeats)
    base = med.get("streaming_llm")
    for method in methods:
        per = med[method]
        ratio = f"{per / base:.2f}x" if base else "-"
        print(f"| {method} | {per:.3f} | {per * s['num_layers']:.1f} | {ratio} |")


def _cache_ms(method, B, H, G, D, m, steps) -> float:
    """ms per layer-step of append + observe + compress for ``method`` at budget ``m`` (fixed random inputs)."""
    gen = torch.Generator().manual_seed(0)
    policy = make_policy(method, m)
    k, v = torch.randn(B, H, m, D, generator=gen), torch.randn(B, H, m, D, generator=gen)
    try:
        state = LayerState.empty(k, v, 0, stats=policy.stats)
    except (TypeError, AttributeError):  # the first core: no capacity or statistics arguments
        state = LayerState.empty(k, v)
    state.append(k, v, torch.arange(m))
    attn = torch.rand(B, H * G, m, m, generator=gen).tril()
    state.observe(attn / attn.sum(-1, keepdim=True))
    new = torch.randn(steps, B, H, 1, D, generator=gen)
    weights = torch.rand(steps, B, H * G, 1, m + 1, generator=gen)
    weights = weights / weights.sum(-1, keepdim=True)
    began = time.perf_counter()
    for t in range(steps):
        state.append(new[t], new[t], torch.tensor([m + t]))
        state.observe(weights[t])
        policy.compress(state)
    return (time.perf_counter() - began) / steps * 1000
