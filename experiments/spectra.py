"""Singular-value spectra of keys (pre/post RoPE), values and queries: WeightedKV Fig. 1.

    python -m experiments.spectra --model default --corpus books --sequences 10 --tokens 1024 --out DIR

Writes DIR/spectra.json and the figures (HTML, PNG) of analysis.plots.spectra; all the logic
lives in analysis.spectra. DIR is built next to itself and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import sys

from analysis.errors import UserError

KINDS = ("key_pre_rope", "key_post_rope", "value", "query_post_rope")


def parse_layers(text: str | None) -> list[int] | None:
    """'0,5,10-12' -> [0, 5, 10, 11, 12]; None -> None (all layers)."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"--layers {text!r}: expected comma-separated layers and ranges, e.g. 0,5,10-12") from None
    return sorted(set(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.spectra", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="model id or local path (default: the embedded SmolLM2-135M)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--corpus", default=None, help="corpus name (books, web, latex, math); books if no other source")
    src.add_argument("--text", default=None, metavar="FILE_OR_DIR", help="your own UTF-8 text file or directory")
    src.add_argument("--run", default=None, metavar="RUN_DIR", help="use an existing capture run instead of capturing")
    p.add_argument("--sequences", type=int, default=10, help="number of sequences, documents or chunks (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sequence, at least head_dim (default: %(default)s)")
    p.add_argument("--layers", default=None, help="layers to analyse, e.g. 0,5,10-12 (default: all)")
    p.add_argument("--center", action="store_true", help="mean-centre each sequence's T x d matrix over tokens")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... for capture and SVD (default: %(default)s)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (spectra.json + figures)")
    p.add_argument("--no-png", action="store_true", help="write HTML figures only (PNG needs chromium)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out directory")
    return p


def get_capture(args, layers):
    if args.run:
        from analysis.runs import load_run
        return load_run(args.run)
    from analysis.capture import capture_sequences
    from analysis.corpora import load_documents, token_sequences
    from analysis.models import load_model

    loaded = load_model(args.model, device=args.device)
    head_dim = loaded.summary()["head_dim"]
    if args.tokens < head_dim:  # check before the expensive capture
        raise UserError(f"rank is bounded by T={args.tokens}, fewer tokens than head_dim={head_dim}; "
                        f"use --tokens >= {head_dim}")
    docs = load_documents(corpus=args.corpus or (None if args.text else "books"), text=args.text)
    seqs = token_sequences(loaded.tokenizer, docs, args.tokens, args.sequences)
    print(f"capturing {len(seqs)} sequence(s) of {args.tokens} tokens from {loaded.model_id}", file=sys.stderr)
    return capture_sequences(loaded, seqs, layers=layers, kinds=KINDS, progress=True)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from analysis.plots.export import publish_dir, staging_dir, write_atomic, write_figure
    from analysis.plots.spectra import standard_figures
    from analysis.spectra import compute_spectra, summary_sentence

    layers = parse_layers(args.layers)
    staging_dir(args.out, args.overwrite).rmdir()  # fail fast on a non-empty --out, before capturing
    capture = get_capture(args, layers)
    kinds = [k for k in KINDS if k in capture.kinds]
    result = compute_spectra(capture, kinds=kinds, layers=layers, center=args.center)
    stage = staging_dir(args.out, args.overwrite)
    try:
        data = json.dumps(result.to_json(), indent=1).encode()
        files = [write_atomic(stage / "spectra.json", data)]
        for stem, fig in standard_figures(result).items():
            files += write_figure(fig, stage, stem, png=not args.no_png)
        publish_dir(stage, args.out)
    except BaseException:
        import shutil
        shutil.rmtree(stage, ignore_errors=True)
        raise
    print(summary_sentence(result))
    print(f"wrote {len(files)} file(s) to {args.out}: " + ", ".join(f.name for f in files))
    return 0


def run(argv=None) -> int:
    try:
        return main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
