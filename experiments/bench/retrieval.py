"""Benchmark of the retrieval grid (issue 16, Speed): trials x methods as batch rows against trial by trial.

    python -m experiments.bench.retrieval                       # the issue's grid: a 2k-token passkey,
        # 5 depths x 7 methods x 1 budget (128) x 10 trials (350 rows: sized for a GPU)
    python -m experiments.bench.retrieval --lengths 256 --depths 0,100 --trials 2 \\
        --methods weightedkv,weightedkv_evict,h2o --budget 32    # what fits a shared 2-core CPU

In one run: (1) the whole grid as batch rows of one decode (``run_units``, as the command runs it);
(2) the same units one at a time (batch 1); (3) one unit's decode-mode retrieval against one
perplexity window (``window_nll``) of the same tokens under the same job; (4) the grid in prefill
mode, batched (one forward per prompt, shared by its methods) against one unit at a time. Checks
that batched and one-at-a-time runs give the same answers, then prints a markdown table of seconds
and ratios.
"""

from __future__ import annotations

import torch

from analysis.compress import method_names
from analysis.retrieval.grid import build_prompts, grid_units, retrieval_settings
from analysis.retrieval.run import run_batch, run_units
from analysis.runtime.batching import Batching
from analysis.runtime.decode import window_nll
from experiments.bench.measure import timed
from experiments.common import add_model_args, load_model_from_args, new_parser, run_main

ISSUE_METHODS = ",".join(method_names(compressing=True))


def build_parser():
    parser = new_parser("bench.retrieval", __doc__)
    add_model_args(parser)
    parser.add_argument("--lengths", default="2048", help="prompt length (default: 2048)")
    parser.add_argument("--depths", default="0,25,50,75,100", help="depths in %% (default: 0,25,50,75,100)")
    parser.add_argument("--methods", default=ISSUE_METHODS, help=f"default: {ISSUE_METHODS}")
    parser.add_argument("--budget", default="128", help="one budget (default: 128)")
    parser.add_argument("--trials", type=int, default=10, help="trials per cell (default: 10)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    settings = retrieval_settings("passkey", "decode", args.lengths, args.depths, args.budget, args.methods,
                                  args.trials)
    loaded = load_model_from_args(args)
    model = loaded.model
    units = grid_units(settings, build_prompts(loaded.tokenizer, settings))
    batched_s, batched = timed(lambda: run_units(model, units, "decode", batching=Batching(batch_size=len(units))))
    single_s, single = timed(lambda: [run_batch(model, [u], "decode")[0] for u in units])
    worst = max(abs(a["answer_logprob"] - b["answer_logprob"]) for a, b in zip(batched, single))
    same = sum(a["correct"] == b["correct"] for a, b in zip(batched, single))
    unit = units[0]
    ids = torch.tensor([list(unit.prompt.ids) + list(unit.prompt.answer)])  # (1, L + A): the same tokens
    window_s, _ = timed(lambda: window_nll(model, ids.to(loaded.device), unit.job))
    retrieval_s, _ = timed(lambda: run_batch(model, [unit], "decode"))
    prefill_s, prefill = timed(lambda: run_units(model, units, "prefill", batching=Batching(batch_size=len(units))))
    prefill_single_s, prefill_single = timed(lambda: [run_batch(model, [u], "prefill")[0] for u in units])
    worst = max(worst, *(abs(a["answer_logprob"] - b["answer_logprob"]) for a, b in zip(prefill, prefill_single)))
    same += sum(a["correct"] == b["correct"] for a, b in zip(prefill, prefill_single))
    length = settings.lengths[0]
    print(f"passkey {length} tokens, {len(settings.depths)} depths x {len(settings.jobs)} jobs x "
          f"{settings.trials} trials = {len(units)} rows, budget {settings.budgets[0]}, "
          f"{torch.get_num_threads()} thread(s), {loaded.device}\n")
    print("| run | seconds | ratio |\n|---|---|---|")
    print(f"| trial by trial (batch 1), {len(units)} decodes | {single_s:.1f} | 1.00 |")
    print(f"| batched (rows of one decode) | {batched_s:.1f} | {single_s / batched_s:.2f}x faster |")
    print(f"| one perplexity window ({ids.shape[1]} tokens, {unit.job.key}) | {window_s:.2f} | 1.00 |")
    print(f"| one retrieval trial, decode mode, same tokens and job | {retrieval_s:.2f} | "
          f"{retrieval_s / window_s:.2f}x the window |")
    print(f"| prefill mode, trial by trial (a forward per row) | {prefill_single_s:.1f} | 1.00 |")
    print(f"| prefill mode, batched (a forward per prompt, shared by its {len(settings.jobs)} jobs) | "
          f"{prefill_s:.1f} | {prefill_single_s / prefill_s:.2f}x faster |")
    print(f"\nbatched vs trial by trial (both modes): same exact match in {same}/{2 * len(units)} rows, "
          f"largest answer log-prob difference {worst:.2e}")


if __name__ == "__main__":
    run_main(main)
