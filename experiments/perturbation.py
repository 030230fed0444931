"""One-step perturbation of future attention: WeightedKV merge vs eviction of the same token (Fig. 2).

    python -m experiments.perturbation --model default --corpus books --tokens 1024 --sequences 2 \\
        --layers 0,5,10,15,20,25,29 --steps 256,512,768 --future 200 --out DIR

Writes DIR/perturbation.json (analysis.perturbation.perturbation_study), built atomically.
"""

from __future__ import annotations

import argparse

from experiments.common import (add_output_args, command_parser, load_model_from_args,
                                parse_ints, run_main, text_source)

KINDS = ("query_post_rope", "key_post_rope", "value")


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("perturbation", __doc__)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--sequences", type=int, default=2, help="how many sequences (default: 2)")
    parser.add_argument("--layers", default=None, help="layers, e.g. 0,5,10-12 (default: all)")
    parser.add_argument("--steps", default="256,512,768", help="compression positions t (default: 256,512,768)")
    parser.add_argument("--future", type=int, default=200, help="future queries scored (default: 200)")
    parser.add_argument("--methods", default="weightedkv,weightedkv_evict",
                        help="comma list of methods (default: weightedkv,weightedkv_evict)")
    parser.add_argument("--sinks", type=int, default=4, help="protected first slots (default: 4)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_output_args(parser)
    return parser


def main(argv=None) -> None:
    import torch

    from analysis.capture import capture_sequences
    from analysis.compress import METHODS
    from analysis.corpora import load_documents, token_sequences
    from analysis.errors import UserError
    from analysis.perturbation import perturbation_study
    from analysis.runs import atomic_dir, check_out_dir, write_json

    args = build_parser().parse_args(argv)
    layers, steps = parse_ints(args.layers, "layers"), parse_ints(args.steps, "steps")
    methods = tuple(m.strip() for m in args.methods.split(","))
    if args.tokens < 2 or args.sequences < 1 or args.future < 1 or args.sinks < 0:
        raise UserError("--tokens >= 2, --sequences >= 1, --future >= 1 and --sinks >= 0 are required")
    bad = [m for m in methods if m not in METHODS or m == "full"]
    if bad:
        raise UserError(f"unknown or non-compressing method(s) {bad}; valid: {', '.join(sorted(set(METHODS) - {'full'}))}")
    if args.future + 2 > args.tokens:
        raise UserError(f"--future {args.future} leaves no room in --tokens {args.tokens}: need tokens >= future + 2")
    if not steps or min(steps) < 2 or max(steps) + args.future > args.tokens:
        raise UserError(f"--steps must lie in 2..{args.tokens - args.future} (tokens - future), got {args.steps}")
    check_out_dir(args.out, args.overwrite)  # fail before the expensive part
    if args.threads:
        torch.set_num_threads(args.threads)
    docs = load_documents(**text_source(args))
    loaded = load_model_from_args(args)
    n_layers = loaded.summary().get("num_layers") or loaded.model.config.num_hidden_layers
    if layers and (min(layers) < 0 or max(layers) >= n_layers):
        raise UserError(f"--layers must lie in 0..{n_layers - 1}, got {args.layers}")
    sequences = token_sequences(loaded.tokenizer, docs, args.tokens, args.sequences)
    capture = capture_sequences(loaded, sequences, layers=layers, kinds=KINDS, progress=not args.quiet)
    with torch.inference_mode():
        study = perturbation_study(capture, layers=layers, steps=steps, future=args.future, methods=methods,
                                   sinks=args.sinks)
    study |= {"model": loaded.model_id, "source": text_source(args), "tokens": args.tokens,
              "text_ids": [text_id for text_id, _ in sequences]}
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_json(tmp / "perturbation.json", study)
    for name, res in study["methods"].items():
        err, cos = res["rel_error"], res["attn_cosine_padded"]
        print(f"{name}: rel. output error {err['mean']:.3g} ± {err['std']:.3g}, "
              f"padded attention cosine {cos['mean']:.6f} ± {cos['std']:.2g}")
    if "merge_vs_evict" in study:
        mv = study["merge_vs_evict"]
        print(f"merge closer than evict in {mv['merge_wins']:.1%} of {mv['cases']} (layer, row, KV head, t) cases")


if __name__ == "__main__":
    run_main(main)
