"""Sliding-window perplexity under compressed KV caches (the WeightedKV paper's Table I and Fig. 4).

    python -m experiments.perplexity --model default --corpus books --tokens 4096 --window 1024 \\
        --budget 128,256 --methods weightedkv,weightedkv_evict,h2o,tova,cam,streaming_llm --out DIR

Writes DIR/perplexity.json, DIR/table.csv, DIR/table.md, DIR/nll.safetensors and figures
(HTML + PNG). A killed run resumes where it stopped: finished batches are kept in a hidden
.DIR.partial directory beside DIR until the whole sweep is written.
"""

from __future__ import annotations

import argparse
import shutil

from experiments.common import (add_output_args, command_parser, load_model_from_args,
                                parse_ints, run_main, text_source)


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("perplexity", __doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per document (default: 4096)")
    parser.add_argument("--documents", type=int, default=1, help="documents to evaluate (default: 1)")
    parser.add_argument("--window", type=int, default=1024, help="window W, stride W/2 (default: 1024)")
    parser.add_argument("--budget", default="128,256", help="cache sizes m per layer (default: 128,256)")
    parser.add_argument("--methods", default="weightedkv,weightedkv_evict,h2o,tova,cam,streaming_llm",
                        help="comma list; 'full' adds the uncompressed reference (default: all compressing)")
    parser.add_argument("--sinks", type=int, default=4, help="attention sinks kept (default: 4)")
    parser.add_argument("--recent", type=int, default=None, help="recent window (default: budget/2 - sinks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of cam and random (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows decoded together (default: 32)")
    parser.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_output_args(parser)
    return parser


def main(argv=None) -> None:
    from tqdm.auto import tqdm

    from analysis.corpora import load_documents, token_sequences
    from analysis.errors import UserError
    from analysis.perplexity import load_partial_settings, make_windows, run_sweep, save_sweep, sweep_jobs
    from analysis.runs import check_out_dir

    args = build_parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = parse_ints(args.budget, "budget")
    jobs = sweep_jobs(methods, budgets, args.window, sinks=args.sinks, recent=args.recent)  # validate before any work
    if args.tokens < args.window:
        raise UserError(f"--tokens {args.tokens} is shorter than --window {args.window}")
    out = check_out_dir(args.out, args.overwrite)
    partial = out.parent / f".{out.name}.partial"
    if args.overwrite:
        shutil.rmtree(partial, ignore_errors=True)

    docs = load_documents(**text_source(args))
    loaded = load_model_from_args(args)
    if loaded.summary()["max_positions"] and args.window > loaded.summary()["max_positions"]:
        raise UserError(f"--window {args.window} exceeds the model's {loaded.summary()['max_positions']} positions")
    sequences = token_sequences(loaded.tokenizer, docs, args.tokens, args.documents)
    windows = make_windows(sequences, args.window)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "quiet", "no_png", "batch_size")}
    load_partial_settings(partial, settings)

    bar = tqdm(total=len(jobs) * len(windows.docs), unit="window", desc="perplexity", disable=args.quiet)
    summary, tensors = run_sweep(loaded, windows, methods, budgets, source=text_source(args), tokens=args.tokens,
                                 documents=args.documents, sinks=args.sinks, recent=args.recent, seed=args.seed,
                                 batch_size=args.batch_size, partial=partial, progress=bar.update,
                                 on_job=lambda m, b: bar.set_postfix_str(f"{m}@{b or 'full'}"))
    bar.close()
    save_sweep(out, summary, tensors, overwrite=args.overwrite, png=not args.no_png)
    shutil.rmtree(partial, ignore_errors=True)
    for r in summary["results"]:
        print(f"{r['method']:>16} m={r['budget']:<5} ppl {r['ppl']:.3f}  ({r['tokens']} tokens, {r['seconds']:.1f} s)")
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main)
