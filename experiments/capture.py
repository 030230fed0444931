"""Capture queries, pre/post-RoPE keys, values and attention statistics of a model on real text.

    python -m experiments.capture --model default --corpus books --tokens 1024 --out runs/austen
"""

from __future__ import annotations

import argparse

from analysis.errors import UserError
from analysis.io import check_out_dir
from analysis.runtime.capture import KINDS
from analysis.runtime.capture_text import capture_documents
from analysis.runtime.runs import save_run
from analysis.text.corpora import load_documents
from experiments.common import add_output_args, command_parser, load_model_from_args, parse_ints, run_main, text_source


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("capture", __doc__)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--sequences", type=int, default=1, help="how many sequences (default: 1)")
    parser.add_argument("--layers", default=None, help="layers to record, e.g. 0,5,10-12 (default: all)")
    parser.add_argument("--kinds", default=None,
                        help="comma list of query_post_rope,key_pre_rope,key_post_rope,value (default: all)")
    add_output_args(parser)
    return parser


def main(argv=None) -> None:

    args = build_parser().parse_args(argv)
    if args.tokens < 1 or args.sequences < 1:
        raise UserError("--tokens and --sequences must be at least 1")
    check_out_dir(args.out, args.overwrite)
    kinds = tuple(args.kinds.split(",")) if args.kinds else KINDS
    docs = load_documents(**text_source(args))
    loaded = load_model_from_args(args)
    capture = capture_documents(loaded, docs, text_source(args), args.tokens, args.sequences,
                                layers=parse_ints(args.layers, "layers"), kinds=kinds, progress=not args.quiet)
    save_run(capture, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(capture.meta['text_ids'])} x {args.tokens} tokens, layers {capture.meta['layers']}")


if __name__ == "__main__":
    run_main(main)
