"""Benchmarks of the compression core (ratios within one run; results go to docs/benchmarks.md).

    python -m experiments.bench_compress step        # decode step per method vs streaming_llm / full
    python -m experiments.bench_compress memory      # cache bytes and peak RSS from 1k to 8k tokens
    python -m experiments.bench_compress throughput  # batched perplexity evaluator vs naive loop
    python -m experiments.bench_compress profile --batch 32   # where a decode step's time goes

Every timing is the median of interleaved repeats, so slow drift on a shared machine hits every
method alike. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch

from experiments.common import add_model_args, load_model_from_args, parse_ints, run_main


def _median_ms(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats)) * 1000


def _decode_timer(model, method, budget, length, batch, steps, device):
    """Return a function that prefills ``length`` tokens, then times ``steps`` single-token steps."""
    from analysis.cache import CompressedCache

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, length + steps + 2), generator=torch.Generator().manual_seed(0)).to(device)

    def run(around_steps=contextlib.nullcontext) -> float:
        cache = CompressedCache(model, method, budget)
        with torch.inference_mode():
            for start in range(0, length, 256):  # chunks: same state, bounded attention memory
                stop = min(start + 256, length)
                model(ids[:, start:stop], past_key_values=cache, position_ids=torch.arange(start, stop, device=device).expand(batch, -1))
            model(ids[:, length : length + 1], past_key_values=cache, position_ids=torch.full((batch, 1), length, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            with around_steps():
                for t in range(length + 1, length + 1 + steps):
                    model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((batch, 1), t, device=device))
            if device.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - began) / steps

    return run


def bench_step(loaded, args) -> None:
    from analysis.compress import METHODS

    methods = [m for m in METHODS if m not in ("full",)]
    print(f"\n### Decode step, batch {args.batch}, {args.steps} steps, median of {args.repeats} (ms/step)\n")
    print("| budget | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for budget in parse_ints(args.budgets, "budgets"):
        timers = {m: _decode_timer(loaded.model, m, budget, budget, args.batch, args.steps, loaded.device) for m in methods}
        times = {m: [] for m in methods}
        for _ in range(args.repeats):  # interleaved
            for m in methods:
                times[m].append(timers[m]() * 1000)
        med = {m: statistics.median(v) for m, v in times.items()}
        base = med["streaming_llm"]
        print(f"| {budget} | " + " | ".join(f"{med[m]:.1f} ({med[m] / base:.2f}x)" for m in methods) + " |")
    print(f"\n### Full cache vs compressed (m=256) at growing context, batch {args.batch} (ms/step)\n")
    print("| context | full | weightedkv m=256 | streaming_llm m=256 | full / weightedkv |\n|---|---|---|---|---|")
    for length in parse_ints(args.lengths, "lengths"):
        row = {m: _median_ms(_decode_timer(loaded.model, m, None if m == "full" else 256, length, args.batch,
                                           args.steps, loaded.device), args.repeats)
               for m in ("full", "weightedkv", "streaming_llm")}
        print(f"| {length} | {row['full']:.1f} | {row['weightedkv']:.1f} | {row['streaming_llm']:.1f} | "
              f"{row['full'] / row['weightedkv']:.2f} |")


def bench_memory(loaded, args) -> None:
    """Feed up to 8k tokens in 64-token chunks; report cache bytes and process peak RSS per 1k."""
    from analysis.cache import CompressedCache

    model, device = loaded.model, loaded.device
    lengths = parse_ints(args.lengths, "lengths")
    print("\n### Memory while reading a long text, batch 1 (cache = keys + values + statistics, all layers)\n")
    print("| method | " + " | ".join(f"{n} tok" for n in lengths) + " |\n|---|" + "---|" * len(lengths))
    for method, budget in (("weightedkv", 256), ("full", None)):
        cache = CompressedCache(model, method, budget)
        ids = torch.randint(0, model.config.vocab_size, (1, max(lengths)), generator=torch.Generator().manual_seed(0)).to(device)
        cells = []
        with torch.inference_mode():
            for start in range(0, max(lengths), 64):
                model(ids[:, start : start + 64], past_key_values=cache,
                      position_ids=torch.arange(start, start + 64, device=device)[None])
                if start + 64 in lengths:
                    states = [layer.state for layer in cache.layers]
                    size = sum(t.numel() * t.element_size() for s in states
                               for t in (s.keys, s.values, s.positions, s.acc, s.count, s.last))
                    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
                    cells.append(f"{size / 2**20:.1f} MB cache, {peak / 2**20:.0f} MB peak")
        print(f"| {method} m={budget or 'all'} | " + " | ".join(cells) + " |")


def bench_throughput(loaded, args) -> None:
    """Batched window evaluator vs a naive loop: one window at a time, one model() call per token."""
    from analysis.attention import grouped_attention
    from analysis.cache import CompressedCache
    from analysis.perplexity import window_nll

    model, device, W = loaded.model, loaded.device, args.window
    ids = torch.randint(0, model.config.vocab_size, (args.batch, W), generator=torch.Generator().manual_seed(0))
    began = time.perf_counter()
    window_nll(model, ids, "weightedkv", args.budget)
    batched = args.batch * (W - 1) / (time.perf_counter() - began)

    naive_tokens = W - 1
    cache = CompressedCache(model, "weightedkv", args.budget)
    row = ids[:1].to(device)
    began = time.perf_counter()
    with torch.inference_mode(), grouped_attention(model):  # the same attention as window_nll
        for t in range(naive_tokens):
            logits = model(row[:, t : t + 1], past_key_values=cache, position_ids=torch.full((1, 1), t, device=device)).logits
            torch.log_softmax(logits.float(), -1)
    naive = naive_tokens / (time.perf_counter() - began)
    print(f"\n### Perplexity evaluation throughput, weightedkv m={args.budget}, window {W}\n")
    print("| evaluator | tokens/s | ratio |\n|---|---|---|")
    print(f"| naive loop (1 window, 1 token per model() call, same attention) | {naive:.1f} | 1.00 |")
    print(f"| window_nll, {args.batch} windows as batch rows | {batched:.1f} | {batched / naive:.1f} |")


def bench_profile(loaded, args) -> None:
    """Where a decode step's time goes: torch profiler over 10 steps, top operators by self time."""
    from torch.profiler import profile

    from analysis.attention import grouped_attention

    run = _decode_timer(loaded.model, "weightedkv", args.budget, args.budget, args.batch, 10, loaded.device)
    with grouped_attention(loaded.model):  # the attention the perplexity evaluator uses
        run()  # warm-up
        prof = profile()
        step = run(lambda: prof)
    print(f"\n### Profile of a weightedkv m={args.budget} decode step, batch {args.batch}: {step * 1000:.0f} ms\n")
    print("| operator | ms per step | share |\n|---|---|---|")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events[:8]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1000 / 10:.1f} | {e.self_cpu_time_total / total:.0%} |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_compress", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("step", "memory", "throughput", "profile"))
    add_model_args(parser)
    parser.add_argument("--budgets", default="128,256,1024", help="budgets for 'step' (default: 128,256,1024)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths (default: 1k..8k)")
    parser.add_argument("--batch", type=int, default=1, help="batch rows (default: 1; use 32+ for throughput)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per repeat (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats, median kept (default: 3)")
    parser.add_argument("--window", type=int, default=512, help="window for 'throughput' (default: 512)")
    parser.add_argument("--budget", type=int, default=128, help="budget for 'throughput' (default: 128)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_from_args(args)
    print(f"model {loaded.model_id}, device {loaded.device}, torch threads {torch.get_num_threads()}")
    benches = {"step": bench_step, "memory": bench_memory, "throughput": bench_throughput, "profile": bench_profile}
    benches[args.what](loaded, args)


if __name__ == "__main__":
    run_main(main)
