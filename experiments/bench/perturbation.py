"""The perturbation study's cost (``experiments.bench.compress`` perturb; results in docs/benchmarks.md).

The teacher-forced sweep against one perplexity run of the same jobs over the same tokens, and a plain
forward of the model over them; each part in a fresh process that runs ``perturb_part``.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from analysis.compress import method_names
from analysis.errors import UserError
from analysis.jobs.job import make_jobs
from analysis.models.loading import load_model
from analysis.perplexity.runner import run_jobs
from analysis.perplexity.windows import make_windows
from analysis.perturbation.study import Settings, run_study
from analysis.runtime.capture import last_logit_only
from analysis.text.corpora import austen_first, token_sequences
from experiments.bench.measure import in_fresh_process
from experiments.common import parse_ints

PERTURB_METHODS = method_names(compressing=True)

PERTURB_CHILD = """
import sys
from experiments.bench.perturbation import perturb_part
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
    runs: dict[str, list[list[float]]] = {p.strip(): [] for p in args.parts.split(",")}
    if not set(runs) <= {"forward", "sweep", "perplexity"}:
        raise UserError(f"--parts takes forward, sweep and perplexity, got {args.parts!r}")
    for _ in range(args.repeats):
        for part in runs:
            runs[part].append(in_fresh_process(PERTURB_CHILD, part, args.model, T, budgets,
                                               args.threads or torch.get_num_threads()))
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
