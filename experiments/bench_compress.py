"""Benchmarks of the compression core (ratios within one run; results go to docs/benchmarks.md).

    python -m experiments.bench_compress step        # decode step per method vs streaming_llm / full
    python -m experiments.bench_compress memory      # cache bytes and peak RSS from 1k to 8k tokens
    python -m experiments.bench_compress throughput  # batched perplexity evaluator vs naive loop
    python -m experiments.bench_compress profile --batch 32   # where a decode step's time goes
    python -m experiments.bench_compress fullstep --batch 32  # compressed step vs full-cache step, same slots
    python -m experiments.bench_compress sweep       # a 1-window sweep: jobs as batch rows vs one by one
    python -m experiments.bench_compress heads --window 256 --budget 32   # heads evaluate: plans as rows
    python -m experiments.bench_compress rows --window 256 --budget 32 --ks 2,4   # packing vs the model's batching
    python -m experiments.bench_compress prompt      # generate() after a long prompt, compressed vs full
    python -m experiments.bench_compress prefill     # peak memory of a chunked 4k-token prefill (subprocess)
    python -m experiments.bench_compress cache --batch 32   # cache management alone: append+observe+compress
    python -m experiments.bench_compress cache --budget 256 --methods streaming_llm,weightedkv,weightedkv_similar
    python -m experiments.bench_compress camprompt   # peak memory of CaM's long-prompt pass (subprocess)
    python -m experiments.bench_compress perturb --window 1024 --budgets 128,256  # sweep vs perplexity run

Every timing is the median of interleaved repeats, so slow drift on a shared machine hits every
method alike. Prints markdown tables.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.profiler import profile
from transformers import DynamicCache

from analysis.compress import LayerState, make_policy, method_names
from analysis.errors import UserError
from analysis.heads.allocate import baseline
from analysis.heads.evaluate import evaluate_plans
from analysis.jobs.job import Job, make_jobs
from analysis.jobs.plan import Plan
from analysis.models.loading import load_model
from analysis.options import parse_names
from analysis.perplexity.runner import run_jobs
from analysis.perplexity.windows import make_windows
from analysis.perturbation.study import Settings, run_study
from analysis.runtime import kernel as attention
from analysis.runtime.cache import CompressedCache
from analysis.runtime.capture import last_logit_only
from analysis.runtime.decode import window_nll
from analysis.text.corpora import austen_first, load_documents, token_sequences
from experiments.common import add_model_args, load_model_from_args, new_parser, parse_ints, run_main


def _median_ms(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats)) * 1000


def _decode_timer(model, method, budget, length, batch, steps, device):
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


def bench_step(loaded, args) -> None:

    methods = parse_names(args.methods) if args.methods else method_names(compressing=True)
    print(f"\n### Decode step, batch {args.batch}, {args.steps} steps, median of {args.repeats} (ms/step)\n")
    print("| budget | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
    for budget in parse_ints(args.budgets, "budgets"):
        timers = {m: _decode_timer(loaded.model, m, budget, budget, args.batch, args.steps, loaded.device)
                  for m in methods}
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


def bench_throughput(loaded, args) -> None:
    """Batched window evaluator vs a naive loop: one window at a time, one model() call per token."""

    model, device, W = loaded.model, loaded.device, args.window
    ids = torch.randint(0, model.config.vocab_size, (args.batch, W), generator=torch.Generator().manual_seed(0))
    began = time.perf_counter()
    window_nll(model, ids, Job.of("weightedkv", args.budget))
    batched = args.batch * (W - 1) / (time.perf_counter() - began)

    naive_tokens = W - 1
    row = ids[:1].to(device)
    began = time.perf_counter()
    with torch.inference_mode(), CompressedCache(model, "weightedkv", args.budget) as cache:  # same attention
        for t in range(naive_tokens):
            logits = model(row[:, t : t + 1], past_key_values=cache,
                           position_ids=torch.full((1, 1), t, device=device)).logits
            torch.log_softmax(logits.float(), -1)
    naive = naive_tokens / (time.perf_counter() - began)
    print(f"\n### Perplexity evaluation throughput, weightedkv m={args.budget}, window {W}\n")
    print("| evaluator | tokens/s | ratio |\n|---|---|---|")
    print(f"| naive loop (1 window, 1 token per model() call, same attention) | {naive:.1f} | 1.00 |")
    print(f"| window_nll, {args.batch} windows as batch rows | {batched:.1f} | {batched / naive:.1f} |")


def bench_profile(loaded, args) -> None:
    """Where a decode step's time goes: torch profiler over 10 steps, top operators by self time."""

    run = _decode_timer(loaded.model, "weightedkv", args.budget, args.budget, args.batch, 10, loaded.device)
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
        cache = DynamicCache()
        previous = model.config._attn_implementation
        model.set_attn_implementation(attention.register())
        try:
            with torch.inference_mode():
                model(ids[:, :m], past_key_values=cache,
                      position_ids=torch.arange(m, device=device).expand(args.batch, m))
                began = time.perf_counter()
                for t in range(m, m + args.steps):
                    model(ids[:, t : t + 1], past_key_values=cache,
                          position_ids=torch.full((args.batch, 1), t, device=device))
                    cache.crop(-1)  # back to m slots: every step attends over m + 1
            return (time.perf_counter() - began) / args.steps
        finally:
            model.set_attn_implementation(previous)

    timers = {"full (m+1 slots)": full_step}
    for method in ("weightedkv", "streaming_llm"):
        timers[method] = _decode_timer(model, method, m, m, args.batch, args.steps, device)
    times = {k: [] for k in timers}
    for _ in range(args.repeats):
        for k, fn in timers.items():
            times[k].append(fn() * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["full (m+1 slots)"]
    print(f"\n### Decode step at m={m}, batch {args.batch}: compressed vs full cache over the same slots (ms/step)\n")
    print("| cache | ms/step | ratio to full |\n|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / base:.3f} |")


def bench_sweep(loaded, args) -> None:
    """One window, several methods: jobs as batch rows of one decode vs each job on its own."""

    docs = load_documents(corpus="books")
    windows = make_windows(token_sequences(loaded.tokenizer, docs, args.window, 1), args.window)
    methods = ["weightedkv", "h2o", "tova", "streaming_llm"]
    jobs = make_jobs(methods, [args.budget], window=args.window)
    began = time.perf_counter()
    together, _ = run_jobs(loaded.model, windows, jobs)
    packed = time.perf_counter() - began
    began = time.perf_counter()
    alone = {job.key: run_jobs(loaded.model, windows, [job])[0][job.key] for job in jobs}
    separate = time.perf_counter() - began
    worst = max(float((together[k] - alone[k]).abs().max()) for k in alone)
    print(f"\n### One {args.window}-token window, methods {', '.join(methods)} at m={args.budget}\n")
    print("| how | seconds | speed-up |\n|---|---|---|")
    print(f"| one job after another | {separate:.1f} | 1.00 |")
    print(f"| jobs as batch rows of one decode | {packed:.1f} | {separate / packed:.2f} |")
    print(f"\nlargest NLL difference between the two: {worst:.2e}")


def bench_heads(loaded, args) -> None:
    """``heads evaluate``'s decode: a plan and its baselines as batch rows of one decode vs one plan at a time.

    The plans are the baselines of a uniform plan at ``--budget`` slots per head on average (uniform,
    layer, random, uniform-evict), on one ``--window``-token window of the first book.
    """

    s = loaded.summary()
    L, H = s["num_layers"], s["num_kv_heads"]
    like = Plan.uniform(L, H, args.budget, name="like")
    total = args.budget * L * H + L * H // 2  # a total that does not divide: the remainder is spread
    plans = [baseline(n, like, total=total, cap=args.window - 1) for n in ("uniform", "layer", "random",
                                                                            "uniform-evict")]
    docs = load_documents(corpus="books")
    windows = make_windows(token_sequences(loaded.tokenizer, docs, args.window, 1), args.window)
    source = {"corpus": "books"}
    times = {"alone": [], "packed": []}
    for _ in range(args.repeats):  # interleaved
        began = time.perf_counter()
        alone = [evaluate_plans(loaded, windows, [p], source, args.window, 1)[0] for p in plans]
        times["alone"].append(time.perf_counter() - began)
        began = time.perf_counter()
        packed = evaluate_plans(loaded, windows, plans, source, args.window, 1)
        times["packed"].append(time.perf_counter() - began)
    med = {k: statistics.median(v) for k, v in times.items()}
    worst = max(abs(a["ppl"] / b["ppl"] - 1) for a, b in zip(alone, packed))
    print(f"\n### heads evaluate: {len(plans)} plans ({', '.join(p.name for p in plans)}) at {total} slots, "
          f"one {args.window}-token window (median of {args.repeats}, s)\n")
    print("| how | seconds | speed-up |\n|---|---|---|")
    print(f"| one plan at a time (before) | {med['alone']:.1f} | 1.00 |")
    print(f"| plans as batch rows of one decode | {med['packed']:.1f} | {med['alone'] / med['packed']:.2f} |")
    print(f"\nlargest relative perplexity difference between the two: {worst:.1e}; totals "
          f"{sorted({p.total_slots for p in plans})}")


def bench_rows(loaded, args) -> None:
    """Packing k jobs as rows against what the machine allows: the model's own batching speed-up.

    Packing: a one-window sweep of k jobs (the first k compressing methods at ``--budget``) as rows of
    one decode vs one job after another. Limit: plain decode steps (the model's attention, a
    ``DynamicCache`` cropped back to m slots after each step, so every step attends over m + 1
    slots) at batch 1, k times, against one step at batch k. Packing cannot beat the limit.
    """

    model, device, m = loaded.model, loaded.device, args.budget
    docs = load_documents(corpus="books")
    windows = make_windows(token_sequences(loaded.tokenizer, docs, args.window, 1), args.window)
    ids = torch.randint(0, model.config.vocab_size, (max(parse_ints(args.ks, "ks")), m + args.steps + 2),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def plain_step(batch: int) -> float:
        cache = DynamicCache()
        with torch.inference_mode():
            model(ids[:batch, :m], past_key_values=cache, position_ids=torch.arange(m, device=device).expand(batch, m))
            began = time.perf_counter()
            for t in range(m, m + args.steps):
                model(ids[:batch, t : t + 1], past_key_values=cache,
                      position_ids=torch.full((batch, 1), t, device=device))
                cache.crop(-1)
        return (time.perf_counter() - began) / args.steps

    print(f"\n### k jobs as rows against the model's own batching, one {args.window}-token window, "
          f"m = {m} (median of {args.repeats})\n")
    print("| k | one job after another (s) | k jobs as rows (s) | packing speed-up | plain step, batch 1 (ms) | "
          "plain step, batch k (ms) | model's batching speed-up (limit) | packing / limit |")
    print("|---|---|---|---|---|---|---|---|")
    for k in parse_ints(args.ks, "ks"):
        methods = method_names(compressing=True)
        if k > len(methods):
            raise UserError(f"--ks: at most {len(methods)} jobs (one per compressing method), got {k}")
        jobs = [Job.of(name, m) for name in methods[:k]]  # k jobs of one budget: they share a batch
        for job in jobs:
            job.check_window(args.window)
        times = {"alone": [], "packed": [], "one": [], "k": []}
        for _ in range(args.repeats):  # interleaved
            began = time.perf_counter()
            for job in jobs:
                run_jobs(model, windows, [job])
            times["alone"].append(time.perf_counter() - began)
            began = time.perf_counter()
            run_jobs(model, windows, jobs)
            times["packed"].append(time.perf_counter() - began)
            times["one"].append(plain_step(1))
            times["k"].append(plain_step(k))
        med = {key: statistics.median(v) for key, v in times.items()}
        packing = med["alone"] / med["packed"]
        limit = k * med["one"] / med["k"]
        print(f"| {k} | {med['alone']:.1f} | {med['packed']:.1f} | {packing:.2f} | {med['one'] * 1000:.1f} | "
              f"{med['k'] * 1000:.1f} | {limit:.2f} | {packing / limit:.2f} |")


def bench_prompt(loaded, args) -> None:
    """generate() after the Generate page's default Austen prompt: compressed (m=64) vs full."""

    text = next(d for d in load_documents(corpus="books") if "pride" in d.id.lower()).text[:6000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, : args.window].to(loaded.device)
    rows = []
    for method, budget in (("full", None), ("weightedkv", 64)):
        cache = CompressedCache(loaded.model, method, budget)
        began = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=48,
                                  min_new_tokens=48, do_sample=False, pad_token_id=0)
        rows.append((method, budget, time.perf_counter() - began))
        getattr(cache, "close", lambda: None)()
    print(f"\n### generate(): {ids.shape[1]}-token prompt, 48 new tokens\n")
    print("| cache | seconds |\n|---|---|")
    for method, budget, sec in rows:
        print(f"| {method} m={budget or 'all'} | {sec:.1f} |")


def bench_cache(loaded, args) -> None:
    """One layer's append + observe + compress per decode step, without the model (synthetic tensors
    of the model's geometry). Uses only the API every commit has, so ``PYTHONPATH=<older tree>``
    measures an older core with the same script."""

    s = loaded.summary()
    H, G, D, B, m = s["num_kv_heads"], s["num_heads"] // s["num_kv_heads"], s["head_dim"], args.batch, args.budget
    print(f"\n### Cache management per layer and decode step, batch {B}, m={m} (ms; x {s['num_layers']} layers)\n")
    print("| method | ms per layer-step | ms per model step | vs streaming_llm |\n|---|---|---|---|")
    methods = parse_names(args.methods) if args.methods else ["weightedkv", "streaming_llm", "h2o", "cam"]
    times = {m_: [] for m_ in methods}
    for _ in range(args.repeats):  # interleaved repeats, median kept
        for method in methods:
            times[method].append(_cache_ms(method, B, H, G, D, m, args.steps * 10))
    base = statistics.median(times["streaming_llm"]) if "streaming_llm" in times else None
    for method in methods:
        per = statistics.median(times[method])
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
        out = subprocess.run([sys.executable, "-c", PREFILL_CHILD, method, "256"], capture_output=True, text=True,
                             check=True)
        print(f"| {method} | {float(out.stdout.strip().splitlines()[-1]):.0f} |")


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
    print(f"\n### Peak RSS added by one long-prompt pass to m=256, batch 1, {heads} KV heads, D=64 (MB)\n")
    print("| prompt tokens | " + " | ".join(parse_names(args.methods or "cam,weightedkv")) + " |\n|---|---|---|")
    for T in parse_ints(args.lengths, "lengths"):
        peaks = [float(subprocess.run([sys.executable, "-c", CAM_CHILD, m, str(heads), str(T)], capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1])
                 for m in parse_names(args.methods or "cam,weightedkv")]
        print(f"| {T} | " + " | ".join(f"{p:.0f}" for p in peaks) + " |")


PERTURB_METHODS = method_names(compressing=True)

PERTURB_CHILD = """
import sys
from experiments.bench_compress import perturb_part
perturb_part(*sys.argv[1:])
"""


def perturb_part(part: str, model: str, tokens: str, budgets: str, threads: str) -> None:
    """One side of ``perturb`` in this (fresh) process: prints seconds and peak RSS added (MB)."""

    torch.set_num_threads(int(threads))
    loaded = load_model(model)
    T, budgets = int(tokens), [int(b) for b in budgets.split(",")]
    seqs = token_sequences(loaded.tokenizer, austen_first("books"), T, 1)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    began = time.perf_counter()
    if part == "forward":  # the model alone over the same tokens: what any pass over them costs

        ids = torch.tensor([seqs[0][1]], device=loaded.device)
        with torch.inference_mode():
            loaded.model(ids, use_cache=True, **last_logit_only(loaded.model))
    elif part == "sweep":  # what `experiments.perturbation sweep` runs: capture, then every layer's replay

        run_study(loaded, seqs, Settings(mode="sweep", tokens=T, methods=list(PERTURB_METHODS), budgets=budgets))
    else:  # what `experiments.perplexity --window T` runs on the same tokens: one window, every job

        run_jobs(loaded.model, make_windows(seqs, T), make_jobs(PERTURB_METHODS, budgets, window=T))
    seconds = time.perf_counter() - began
    print(seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)


def bench_perturb(loaded, args) -> None:
    """The teacher-forced sweep (all layers x KV heads, 7 methods x 2 budgets, one sequence) against one
    perplexity run of the same jobs over the same tokens, and a plain forward of the model over them;
    each part in a fresh process (its peak RSS is its own), alternating."""


    s = loaded.summary()
    T = args.window
    budgets = ",".join(map(str, parse_ints(args.budgets, "budgets")))
    make_jobs(PERTURB_METHODS, parse_ints(budgets, "budgets"), window=T)  # bad budgets: one line, before any child
    runs: dict[str, list[tuple[float, float]]] = {p.strip(): [] for p in args.parts.split(",")}
    if not set(runs) <= {"forward", "sweep", "perplexity"}:
        raise UserError(f"--parts takes forward, sweep and perplexity, got {args.parts!r}")
    for _ in range(args.repeats):
        for part in runs:
            child = [sys.executable, "-c", PERTURB_CHILD, part, args.model, str(T), budgets,
                     str(args.threads or torch.get_num_threads())]
            out = subprocess.run(child, capture_output=True, text=True, check=True)
            runs[part].append(tuple(map(float, out.stdout.strip().splitlines()[-1].split())))
    # what the capture must hold: queries, keys and values of every layer (float32)
    held = s["num_layers"] * (s["num_heads"] + 2 * s["num_kv_heads"]) * T * s["head_dim"] * 4 / 2**20
    print(f"\n### {s['num_layers']} layers x {s['num_kv_heads']} KV heads, {len(PERTURB_METHODS)} methods x "
          f"budgets {budgets}, {T} tokens of one sequence (median of {args.repeats})\n")
    print("| run | seconds | peak RSS added (MB) |\n|---|---|---|")
    med = {part: [statistics.median(v[i] for v in values) for i in (0, 1)] for part, values in runs.items()}
    for part, (seconds, mb) in med.items():
        print(f"| {part} | {seconds:.1f} | {mb:.0f} |")
    square = s["num_heads"] * T * T * 4 / 2**20
    if {"sweep", "perplexity"} <= set(med):
        print(f"\nsweep / perplexity time: {med['sweep'][0] / med['perplexity'][0]:.2f}")
    print(f"\ncaptured queries, keys and values of all layers: {held:.0f} MB; one layer's T x T attention: "
          f"{square:.0f} MB, all layers': {s['num_layers'] * square:.0f} MB")


def main(argv=None) -> None:
    parser = new_parser("bench_compress", __doc__)
    parser.add_argument("what", choices=("step", "memory", "throughput", "profile", "fullstep", "sweep", "heads",
                                         "rows", "prompt", "prefill", "cache", "perturb", "camprompt"))
    add_model_args(parser)
    parser.add_argument("--budgets", default="128,256,1024",
                        help="budgets for 'step' and 'perturb' (default: 128,256,1024)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths (default: 1k..8k)")
    parser.add_argument("--batch", type=int, default=1, help="batch rows (default: 1; use 32+ for throughput)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per repeat (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats, median kept (default: 3)")
    parser.add_argument("--window", type=int, default=512,
                        help="window for 'throughput', tokens for 'perturb' (default: 512)")
    parser.add_argument("--budget", type=int, default=128,
                        help="budget for 'throughput', 'heads' (mean per head) and 'rows' (default: 128)")
    parser.add_argument("--ks", default="2,4", help="jobs packed as rows, for 'rows' (default: 2,4)")
    parser.add_argument("--parts", default="forward,sweep,perplexity",
                        help="what 'perturb' runs (default: forward,sweep,perplexity)")
    parser.add_argument("--methods", default=None, help="methods for 'step', 'cache' and 'camprompt' (default: theirs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_from_args(args)
    print(f"model {loaded.model_id}, device {loaded.device}, torch threads {torch.get_num_threads()}")
    benches = {"step": bench_step, "memory": bench_memory, "throughput": bench_throughput, "profile": bench_profile,
               "fullstep": bench_fullstep, "sweep": bench_sweep, "heads": bench_heads, "rows": bench_rows,
               "prompt": bench_prompt, "prefill": bench_prefill,
               "cache": bench_cache, "perturb": bench_perturb, "camprompt": bench_camprompt}
    benches[args.what](loaded, args)


if __name__ == "__main__":
    run_main(main)
