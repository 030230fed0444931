"""Merging effects, head by head and end to end: WeightedKV merge vs eviction and the other methods.

    python -m experiments.perturbation fig2 --out DIR      # the paper's Fig. 2: t0=100, next 800 steps
    python -m experiments.perturbation sweep --budget 128,256 --tokens 1024 --out DIR
    python -m experiments.perturbation end2end --budget 128 --tokens 512 --out DIR
    python -m experiments.perturbation ideal --steps 100,300 --future 64 --out DIR

Modes:
  fig2     at step t0 one WeightedKV merge of the lowest-average-attention token, and separately the
           eviction of the same token; relative output error and attention cosine of the next N queries.
  sweep    teacher-forced: each layer's captured queries/keys/values through a cache held to budget m by
           each method, token by token; relative attention-output error per step, layer and KV head.
  end2end  the model decoding the text with a CompressedCache next to a full-cache run: KL of the
           next-token distribution, change in NLL, per-layer attention-output deviation.
  ideal    the paper's exact ideal merge (§III-B) vs its convex approximation vs WeightedKV vs eviction.

Every mode averages over --sequences sequences (default 8; from books and web when neither --corpus nor
--text is given) and writes DIR/perturbation.json, perturbation.csv, curves.safetensors and figures/
(HTML + PNG), atomically. Results are mean ± std over sequences.
"""

from __future__ import annotations

import argparse

import torch
from tqdm.auto import tqdm

from analysis.io import check_out_dir
from analysis.models.loading import EMBEDDED_NAME
from analysis.perturbation.study import Settings, check_result_dir, paired_lines, run_study
from analysis.perturbation.texts import study_sequences, study_source
from analysis.report.save import save_study
from experiments.common import add_model_args, add_output_args, load_model_from_args, new_parser, run_main

ALL_METHODS = "weightedkv,weightedkv_evict,h2o,tova,cam,streaming_llm,random"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("perturbation", __doc__)
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)
    specs = {
        "fig2": ("the paper's Fig. 2 protocol (merge vs evict of one token)", "weightedkv,weightedkv_evict", 800),
        "sweep": ("teacher-forced budget sweep per layer and KV head", ALL_METHODS, None),
        "end2end": ("KL / NLL / per-layer deviation of the model decoding under a compressed cache",
                    "weightedkv,weightedkv_evict,h2o,tova,streaming_llm", None),
        "ideal": ("ideal merge (§III-B) vs convex merges vs eviction", None, 64),
    }
    for mode, (help_text, methods, future) in specs.items():
        p = sub.add_parser(mode, help=help_text, description=help_text)
        add_model_args(p)
        text = p.add_argument_group("text").add_mutually_exclusive_group()
        text.add_argument("--corpus", default=None, help="books, web, latex or math (default: half books, half web)")
        text.add_argument("--text", default=None, metavar="FILE_OR_DIR", help="your own UTF-8 text file or directory")
        p.add_argument("--sequences", type=int, default=8, help="sequences averaged over (default: 8)")
        p.add_argument("--layers", default=None, help="layers, e.g. 0,5,10-12 (default: all)")
        p.add_argument("--heads", default=None, help="KV heads reported, e.g. 0,2 (default: all)")
        p.add_argument("--sinks", type=int, default=4, help="protected first positions (default: 4)")
        p.add_argument("--recent", type=int, default=None,
                       help="protected newest positions, never victims (default: budget/2 - sinks; in fig2 and ideal "
                            "the budget is t - 1, so 45 at t0 = 100: pass --recent 1 to let any but the newest go)")
        p.add_argument("--seed", type=int, default=0, help="seed of cam and random (default: 0)")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        p.add_argument("--no-png", action="store_true", help="write figures as HTML only")
        if mode == "fig2":
            p.add_argument("--t0", type=int, default=100, help="step of the one compression (default: 100)")
        if future is not None:
            p.add_argument("--future", type=int, default=future, help=f"queries scored after it (default: {future})")
        if mode in ("sweep", "end2end"):
            p.add_argument("--tokens", type=int, default=1024 if mode == "sweep" else 512,
                           help=f"tokens per sequence (default: {1024 if mode == 'sweep' else 512})")
            p.add_argument("--budget", default="128,256" if mode == "sweep" else "128",
                           help="cache sizes m, comma list (default: %(default)s)")
        if mode == "ideal":
            p.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default: 512)")
            p.add_argument("--steps", default="100,200,300", help="merge steps t (default: 100,200,300)")
        if methods is not None:
            p.add_argument("--methods", default=methods,
                           help="comma list; 'full' adds the reference; presets and merge:key=value,... points "
                                "are method names too (default: %(default)s)")
        add_output_args(p)
    return parser


def settings_from(args) -> Settings:
    """The mode's options as ``Settings`` (the library checks them, as it does the page's form)."""
    return Settings.from_options(
        args.mode, tokens=getattr(args, "tokens", 0), sequences=args.sequences, layers=args.layers, heads=args.heads,
        methods=getattr(args, "methods", None), budget=getattr(args, "budget", None), t0=getattr(args, "t0", 100),
        future=getattr(args, "future", 0), steps=getattr(args, "steps", None), sinks=args.sinks, recent=args.recent,
        seed=args.seed)


def main(argv=None) -> None:


    args = build_parser().parse_args(argv)
    settings = settings_from(args)
    check_result_dir(args.out, EMBEDDED_NAME if args.model == "default" else args.model)
    check_out_dir(args.out, args.overwrite)  # fail before the expensive part
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_from_args(args)
    settings.check_model(loaded.summary())
    sequences = study_sequences(loaded.tokenizer, settings.tokens, args.sequences, corpus=args.corpus, text=args.text,
                                mode=args.mode)
    bar = tqdm(total=len(sequences), unit="seq", desc=args.mode, disable=args.quiet)
    summary, tensors = run_study(loaded, sequences, settings, progress=bar.update,
                                 source=study_source(args.corpus, args.text))
    bar.close()
    save_study(args.out, summary, tensors, overwrite=args.overwrite, png=not args.no_png)
    for r in summary["results"]:
        if r["layer"] is None and r["kv_head"] is None:
            budget = f" m={r['budget']}" if r["budget"] is not None else ""
            print(f"{r['metric']:>18} {r['method']:>16}{budget}: {r['mean']:.4g} ± {r['std']:.2g}")
    for line in paired_lines(summary):
        print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
