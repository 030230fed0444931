"""What evaluating as batch rows gains (``experiments.bench.compress`` throughput, sweep, heads, rows;
results in docs/benchmarks.md).

    throughput  the perplexity evaluator, --batch windows as batch rows, against a naive token-by-token loop
    sweep       a one-window sweep: jobs as batch rows of one decode against one job after another
    heads       ``heads evaluate``: a plan and its baselines as batch rows against one plan at a time
    rows        packing k jobs as rows against the model's own batching speed-up (the limit)
"""

from __future__ import annotations

import statistics
import time

import torch

from analysis.compress import method_names
from analysis.errors import UserError
from analysis.heads.allocate import baseline
from analysis.heads.evaluate import evaluate_plans
from analysis.jobs.job import Job, make_jobs
from analysis.jobs.plan import Plan
from analysis.perplexity.runner import run_jobs
from analysis.perplexity.windows import make_windows
from analysis.runtime.cache import CompressedCache
from analysis.runtime.decode import window_nll
from analysis.text.corpora import load_documents, token_sequences
from experiments.bench.measure import cropped_step, interleaved_medians, timed
from experiments.common import parse_ints


def _first_book_window(loaded, window: int):
    """One ``window``-token window of the first book."""
    docs = load_documents(corpus="books")
    return make_windows(token_sequences(loaded.tokenizer, docs, window, 1), window)


def bench_throughput(loaded, args) -> None:
    """Batched window evaluator (``--batch`` windows as rows) vs a naive loop: one window at a time, one
    model() call per token."""

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


def bench_sweep(loaded, args) -> None:
    """One window, several methods: jobs as batch rows of one decode vs each job on its own."""

    windows = _first_book_window(loaded, args.window)
    methods = ["weightedkv", "h2o", "tova", "streaming_llm"]
    jobs = make_jobs(methods, [args.budget], window=args.window)
    packed, (together, _) = timed(lambda: run_jobs(loaded.model, windows, jobs))
    separate, alone = timed(lambda: {job.key: run_jobs(loaded.model, windows, [job])[0][job.key] for job in jobs})
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
    windows = _first_book_window(loaded, args.window)
    evaluate = lambda some: evaluate_plans(loaded, windows, some, {"corpus": "books"}, args.window, 1)
    times = {"alone": [], "packed": []}
    for _ in range(args.repeats):  # interleaved
        seconds, alone = timed(lambda: [evaluate([p])[0] for p in plans])
        times["alone"].append(seconds)
        seconds, packed = timed(lambda: evaluate(plans))
        times["packed"].append(seconds)
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
    windows = _first_book_window(loaded, args.window)
    ids = torch.randint(0, model.config.vocab_size, (max(parse_ints(args.ks, "ks")), m + args.steps + 2),
                        generator=torch.Generator().manual_seed(0)).to(device)
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
        med = interleaved_medians({
            "alone": lambda jobs=jobs: timed(lambda: [run_jobs(model, windows, [job]) for job in jobs])[0],
            "packed": lambda jobs=jobs: timed(lambda: run_jobs(model, windows, jobs))[0],
            "one": lambda: cropped_step(model, ids[:1], m, args.steps),
            "k": lambda k=k: cropped_step(model, ids[:k], m, args.steps),
        }, args.repeats)
        packing = med["alone"] / med["packed"]
        limit = k * med["one"] / med["k"]
        print(f"| {k} | {med['alone']:.1f} | {med['packed']:.1f} | {packing:.2f} | {med['one'] * 1000:.1f} | "
              f"{med['k'] * 1000:.1f} | {limit:.2f} | {packing / limit:.2f} |")
