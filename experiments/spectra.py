"""Singular-value spectra of keys (pre/post RoPE), values and queries: WeightedKV Fig. 1.

    python -m experiments.spectra --model default --corpus books --sequences 10 --tokens 1024 --out DIR
    python -m experiments.spectra --run runs/austen --out DIR      # reuse a capture

Writes DIR/spectra.json (analysis.spectra.compute.SpectraResult.to_json) and the figures of
analysis.report.spectra as HTML (plotly.js embedded) and PNG. DIR is built in a temp directory
beside it and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json

from analysis.errors import UserError
from analysis.io import atomic_dir, check_out_dir, write_atomic
from analysis.report.export import write_figure
from analysis.report.spectra import standard_figures
from analysis.runtime.capture import capture_sequences
from analysis.runtime.runs import load_run
from analysis.spectra.compute import compute_spectra, summary_sentence
from analysis.text.corpora import load_documents, token_sequences
from experiments.common import add_output_args, command_parser, load_model_from_args, parse_ints, run_main, text_source

KINDS = ("key_pre_rope", "key_post_rope", "value", "query_post_rope")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("spectra", __doc__)
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="use a saved capture (python -m experiments.capture) instead of capturing; "
                             "excludes --corpus/--text")
    parser.add_argument("--sequences", type=int, default=10, help="how many sequences (default: 10)")
    parser.add_argument("--tokens", type=int, default=1024,
                        help="tokens per sequence, at least head_dim (default: 1024)")
    parser.add_argument("--layers", default=None, help="layers to analyse, e.g. 0,5,10-12 (default: all)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma list of what to decompose (default: {','.join(KINDS)})")
    parser.add_argument("--center", action="store_true",
                        help="mean-centre each sequence's T x d matrix over tokens before the SVD")
    parser.add_argument("--no-png", action="store_true", help="write HTML figures only (PNG needs chromium)")
    add_output_args(parser)
    return parser


def get_capture(args, layers, kinds):

    if args.run:
        if args.corpus or args.text:
            raise UserError("--run uses a saved capture; do not also give --corpus or --text")
        return load_run(args.run, device="cpu" if args.device == "auto" else args.device)

    if args.tokens < 1 or args.sequences < 1:
        raise UserError("--tokens and --sequences must be at least 1")
    docs = load_documents(**text_source(args))
    loaded = load_model_from_args(args)
    head_dim = loaded.summary()["head_dim"]
    if args.tokens < head_dim:  # checked before the expensive capture
        raise UserError(f"rank is bounded by T={args.tokens}, fewer tokens than head_dim={head_dim}; "
                        f"use --tokens >= {head_dim}")
    sequences = token_sequences(loaded.tokenizer, docs, args.tokens, args.sequences)
    return capture_sequences(loaded, sequences, layers=layers, kinds=kinds, progress=not args.quiet)


def main(argv=None) -> None:

    args = build_parser().parse_args(argv)
    layers = parse_ints(args.layers, "layers")
    check_out_dir(args.out, args.overwrite)  # fail before capturing
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise UserError(f"--kinds: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(KINDS)}")
    capture = get_capture(args, layers, tuple(kinds))
    missing = [k for k in kinds if k not in capture.kinds]
    if missing:
        raise UserError(f"{args.run} has no {', '.join(missing)}: capture it again with them, "
                        f"or pass --kinds {','.join(k for k in kinds if k in capture.kinds) or 'value'}")
    result = compute_spectra(capture, kinds=kinds, layers=layers, center=args.center)
    with atomic_dir(args.out, args.overwrite) as tmp:
        files = [write_atomic(tmp / "spectra.json", json.dumps(result.to_json(), indent=1).encode())]
        for stem, fig in standard_figures(result).items():
            files += write_figure(fig, tmp, stem, png=not args.no_png)
    print(summary_sentence(result))
    print(f"wrote {args.out}: " + ", ".join(f.name for f in files))


if __name__ == "__main__":
    run_main(main)
