"""Retrieval under a compressed cache: a passkey or a needle far back in the context, asked for at the end.

    python -m experiments.retrieval passkey --lengths 1024,2048 --depths 0,25,50,75,100 --budget 64,128 \\
        --methods full,weightedkv,weightedkv_evict,h2o --trials 10 --mode decode --out DIR
    python -m experiments.retrieval needle --corpus books --lengths 1024 --budget 128 --out DIR
    python -m experiments.retrieval needle --text FILE ...           (your own haystack)

passkey: the landmark-attention template (filler, "The pass key is N. Remember it. N is the pass key.",
filler, "What is the pass key? The pass key is"), a random 5-digit N. needle: a one-sentence invented
fact put back to a sentence boundary at --depths % of real text, asked for at the end.
--mode decode: the context goes through the cache as the perplexity evaluator feeds it (chunks up to
the budget, then token by token, compressing each step); prefill: one forward ranked once, as
generate() does. --protect-question keeps the question out of compression (kvpress's default).

Scores per trial: exact match of the greedy answer and the teacher-forced log-probability of the
answer; per cell, accuracy with a Wilson 95 % interval. Fates: where the fact's tokens are once the
cache holds the prompt (kept in their own slot with their key, merged into other slots only, gone).

Writes DIR/retrieval.json (settings, one row per cell, by_fate, examples), DIR/retrieval.csv (the
rows), DIR/trials.csv (one row per trial), DIR/by_fate.csv and figures (HTML + PNG). A killed run
resumes from the hidden .DIR.partial directory beside DIR, refusing other settings.
"""

from __future__ import annotations

import argparse
import shutil

from tqdm.auto import tqdm

from analysis.io import check_out_dir, load_partial_settings
from analysis.perplexity.settings import lowrank_options
from analysis.report.retrieval import save_retrieval
from analysis.retrieval.grid import MODES, build_prompts, check_positions, grid_units, retrieval_settings, run_grid
from analysis.retrieval.tasks import TASKS
from analysis.runtime.batching import Batching, check_batch_size
from analysis.text.corpora import load_documents
from experiments.common import (
    add_lowrank_args,
    add_model_args,
    add_output_args,
    load_model_from_args,
    new_parser,
    run_main,
)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("retrieval", __doc__)
    parser.add_argument("task", choices=TASKS, help="passkey or needle")
    add_model_args(parser)
    text = parser.add_argument_group("haystack (needle)").add_mutually_exclusive_group()
    text.add_argument("--corpus", default=None, help="embedded corpus: books, web, latex or math (default: books)")
    text.add_argument("--text", default=None, metavar="FILE", help="your own UTF-8 text file or directory")
    parser.add_argument("--lengths", default="1024,2048", help="prompt lengths in tokens (default: 1024,2048)")
    parser.add_argument("--depths", default="0,25,50,75,100",
                        help="where the fact goes, in %% of the context (default: 0,25,50,75,100)")
    parser.add_argument("--budget", default="64,128", help="cache sizes m per layer (default: 64,128)")
    parser.add_argument("--methods", default=None, help="comma list (default: every method, full included)")
    parser.add_argument("--trials", type=int, default=10, help="trials per cell (default: 10)")
    parser.add_argument("--mode", choices=MODES, default="decode", help="decode (default) or prefill")
    parser.add_argument("--protect-question", action="store_true",
                        help="keep the question out of compression: compress the context only (kvpress)")
    parser.add_argument("--sinks", type=int, default=4, help="attention sinks kept (default: 4)")
    parser.add_argument("--recent", type=int, default=None, help="recent window (default: budget/2 - sinks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of keys, needles and randomised methods")
    parser.add_argument("--batch-size", type=int, default=64, help="rows decoded together (default: 64)")
    parser.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_lowrank_args(parser)
    add_output_args(parser)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    lowrank = lowrank_options(args.key_basis, args.key_rank, args.key_energy, args.value_rank)
    settings = retrieval_settings(args.task, args.mode, args.lengths, args.depths, args.budget, args.methods,
                                  args.trials, args.seed, args.sinks, args.recent, args.protect_question, lowrank)
    check_batch_size(args.batch_size)
    out = check_out_dir(args.out, args.overwrite)
    partial = out.parent / f".{out.name}.partial"
    if args.overwrite:
        shutil.rmtree(partial, ignore_errors=True)
    source = {"text": args.text} if args.text else {"corpus": args.corpus or "books"}
    record = settings.record() | {"model": args.model, "dtype": args.dtype,
                                  "source": source if args.task == "needle" else None}
    if partial.is_dir():  # a resume with other settings fails before the model loads
        load_partial_settings(partial, record, write=False)
    docs = load_documents(**source) if args.task == "needle" else None
    loaded = load_model_from_args(args)
    if lowrank is not None:
        lowrank.basis.check(loaded.model)
    check_positions(settings, loaded.summary()["max_positions"])
    prompts = build_prompts(loaded.tokenizer, settings, docs)
    load_partial_settings(partial, record)
    units = grid_units(settings, prompts)
    bar = tqdm(total=len(units), unit="trial", desc=f"retrieval {args.task}", disable=args.quiet)
    result = run_grid(loaded, settings, prompts, Batching(args.batch_size, partial, bar.update))
    bar.close()
    result["source"] = record["source"]
    save_retrieval(out, result, overwrite=args.overwrite, png=not args.no_png)
    shutil.rmtree(partial, ignore_errors=True)
    if not args.quiet:
        for row in result["rows"]:
            print(f"{row['method']:>16} m={str(row['budget'] or 'full'):<5} L={row['length']:<5} "
                  f"depth {row['depth']:>3}%  acc {row['accuracy']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]  "
                  f"log p {row['answer_logprob']:.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
