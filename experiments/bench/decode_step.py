"""Decode-step speed (``experiments.bench.compress`` step, fullstep, profile; results in docs/benchmarks.md).

    step      a decode step per method against streaming_llm, and the full cache against m = 256 at growing context
    fullstep  a compressed step against a full-cache step over the same number of slots (m + 1)
    profile   where a weightedkv step's time goes: torch profiler, top operators by self time
"""

from __future__ import annotations

import torch
from torch.profiler import profile

from analysis.compress import method_names
from analysis.options import parse_names
from analysis.runtime import kernel as attention
from experiments.bench.measure import cropped_step, decode_timer, interleaved_medians, median_ms
from experiments.common import parse_ints


def bench_step(loaded, args) -> None:
    """Per budget, every method's decode step (prefilled to the budget) against streaming_llm's; then the
    full cache against weightedkv and streaming_llm at m = 256 for each context length."""

    methods = parse_names(args.methods) if args.methods else method_names(compressing=True)
    print(f"\n### Decode step, batch {args.batch}, {args.steps} steps, median of {args.repeats} (ms/step)\n")
    print("| budget | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for budget in parse_ints(args.budgets, "budgets"):
        timers = {m: decode_timer(loaded.model, m, budget, budget, args.batch, args.steps, loaded.device)
                  for m in methods}
        med = {m: s * 1000 for m, s in interleaved_medians(timers, args.repeats).items()}
        base = med["streaming_llm"]
        print(f"| {budget} | " + " | ".join(f"{med[m]:.1f} ({med[m] / base:.2f}x)" for m in methods) + " |")
    print(f"\n### Full cache vs compressed (m=256) at growing context, batch {args.batch} (ms/step)\n")
    print("| context | full | weightedkv m=256 | streaming_llm m=256 | full / weightedkv |\n|---|---|---|---|---|")
    for length in parse_ints(args.lengths, "lengths"):
        row = {m: median_ms(decode_timer(loaded.model, m, None if m == "full" else 256, length, args.batch,
                                         args.steps, loaded.device), args.repeats)
               for m in ("full", "weightedkv", "streaming_llm")}
        print(f"| {length} | {row['full']:.1f} | {row['weightedkv']:.1f} | {row['streaming_llm']:.1f} | "
              f"{row['full'] / row['weightedkv']:.2f} |")


def bench_profile(loaded, args) -> None:
    """Where a decode step's time goes: torch profiler over 10 steps, top operators by self time."""

    run = decode_timer(loaded.model, "weightedkv", args.budget, args.budget, args.batch, 10, loaded.device)
    run()  # warm-up
    prof = profile()
    step = run(lambda: prof)
    print(f"\n### Profile of a weightedkv m={args.budget} decode step, batch {args.batch}: {step * 1000:.0f} ms\n")
    print("| operator | ms per step | share |\n|---|---|---|")
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    for e in events[:10]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1000 / 10:.1f} | {e.self_cpu_time_total / total:.0%} |")


def bench_fullstep(loaded, args) -> None:
    """A compressed decode step against a full-cache step over the same number of slots (m + 1).

    The full cache is a plain DynamicCache prefilled with m tokens and cropped back after each step,
    run under the same kvlens attention (no slot mask), so the ratio is cache management alone.
    """

    model, device, m = loaded.model, loaded.device, args.budget
    ids = torch.randint(0, model.config.vocab_size, (args.batch, m + args.steps + 2),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def full_step() -> float:
        previous = model.config._attn_implementation
        model.set_attn_implementation(attention.register())
        try:
            return cropped_step(model, ids, m, args.steps)
        finally:
            model.set_attn_implementation(previous)

    timers = {"full (m+1 slots)": full_step}
    for method in ("weightedkv", "streaming_llm"):
        timers[method] = decode_timer(model, method, m, m, args.batch, args.steps, device)
    med = {k: s * 1000 for k, s in interleaved_medians(timers, args.repeats).items()}
    base = med["full (m+1 slots)"]
    print(f"\n### Decode step at m={m}, batch {args.batch}: compressed vs full cache over the same slots (ms/step)\n")
    print("| cache | ms/step | ratio to full |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / base:.3f} |")
