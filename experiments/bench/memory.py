"""Memory (``experiments.bench.compress`` memory, prefill, camprompt; results in docs/benchmarks.md).

    memory     cache bytes and peak memory while reading up to 8k tokens, compressed vs full
    prefill    peak RSS added by a chunked 4k-token prefill, each method in a fresh process
    camprompt  peak RSS added by one long-prompt compression pass, each method in a fresh process
"""

from __future__ import annotations

import resource

import torch

from analysis.options import parse_names
from analysis.runtime.cache import CompressedCache
from experiments.bench.measure import in_fresh_process
from experiments.common import parse_ints


def bench_memory(loaded, args) -> None:
    """Feed up to 8k tokens in 64-token chunks; report cache bytes and process peak RSS per 1k."""

    model, device = loaded.model, loaded.device
    lengths = parse_ints(args.lengths, "lengths")
    print("\n### Memory while reading a long text, batch 1 (cache = keys + values + statistics, all layers)\n")
    print("| method | " + " | ".join(f"{n} tok" for n in lengths) + " |\n|---|" + "---|" * len(lengths))
    for method, budget in (("weightedkv", 256), ("full", None)):
        cache = CompressedCache(model, method, budget)
        ids = torch.randint(0, model.config.vocab_size, (1, max(lengths)),
                            generator=torch.Generator().manual_seed(0)).to(device)
        cells = []
        with torch.inference_mode():
            for start in range(0, max(lengths), 64):
                model(ids[:, start : start + 64], past_key_values=cache,
                      position_ids=torch.arange(start, start + 64, device=device)[None])
                if start + 64 in lengths:
                    states = [layer.state for layer in cache.layers if getattr(layer, "state", None) is not None]
                    size = sum(t.numel() * t.element_size() for s in states
                               for t in (s.keys, s.values, s.positions, s.acc, s.count, s.last))
                    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                    cells.append(f"{size / 2**20:.1f} MB cache, {peak / 2**20:.0f} MB peak")
        print(f"| {method} m={budget or 'all'} | " + " | ".join(cells) + " |")


PREFILL_CHILD = """
import resource, sys, torch
from analysis.runtime.cache import CompressedCache
from analysis.models.loading import load_model
lm = load_model(device="cpu")
ids = torch.randint(0, lm.model.config.vocab_size, (1, 4096), generator=torch.Generator().manual_seed(0))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cache = CompressedCache(lm.model, sys.argv[1], int(sys.argv[2]))
with torch.inference_mode():
    for s in range(0, 4096, 512):
        lm.model(ids[:, s:s + 512], past_key_values=cache, position_ids=torch.arange(s, s + 512)[None])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def bench_prefill(loaded, args) -> None:
    """Peak memory added by a 4k-token prefill in 512-token chunks, each method in a fresh process."""

    print("\n### Peak RSS added by a 4,096-token prefill in 512-token chunks, m=256, batch 1 (MB)\n")
    print("| method | peak MB above the loaded model |\n|---|---|")
    for method in ("weightedkv", "h2o", "streaming_llm"):
        print(f"| {method} | {in_fresh_process(PREFILL_CHILD, method, 256)[0]:.0f} |")


CAM_CHILD = """
import resource, sys, torch
from analysis.compress import LayerState, make_policy
B, H, T, D, m = 1, int(sys.argv[2]), int(sys.argv[3]), 64, 256
k = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(0))
state = LayerState.empty(k, k, 0, stats=make_policy(sys.argv[1], m).stats)
state.append(k, k.clone(), torch.arange(T))
state.observe(torch.full((B, H, 1, T), 1.0 / T))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
make_policy(sys.argv[1], m).compress(state)  # one pass: T - m victims ranked at once
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def bench_camprompt(loaded, args) -> None:
    """Peak RSS added by one long-prompt compression pass (T - 256 victims at once), each in a fresh process.

    PYTHONPATH=<older tree> measures an older core with the same child."""

    heads = 8  # a 7B-class model's KV heads: the temporaries scale with H x victims x slots
    methods = parse_names(args.methods or "cam,weightedkv")
    print(f"\n### Peak RSS added by one long-prompt pass to m=256, batch 1, {heads} KV heads, D=64 (MB)\n")
    print("| prompt tokens | " + " | ".join(methods) + " |\n|---|---|---|")
    for T in parse_ints(args.lengths, "lengths"):
        peaks = [in_fresh_process(CAM_CHILD, m, heads, T)[0] for m in methods]
        print(f"| {T} | " + " | ".join(f"{p:.0f}" for p in peaks) + " |")
