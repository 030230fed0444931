"""Low-rank keys against token compression at equal cache bytes (issue 18).

    python -m experiments.lowrank calibrate --corpus books --documents 4 --out BASIS
    python -m experiments.lowrank compare --basis BASIS --corpus books --fractions 0.5,0.25,0.125 --out DIR
    python -m experiments.lowrank cost --basis BASIS --corpus books --ranks 4,8,16 --out DIR

calibrate  fits a basis per (layer, KV head) on the first --documents documents (pre-RoPE keys,
           uncentred unless --center; values never centred): BASIS/basis.safetensors + basis.json.
compare    perplexity of every family (token eviction, merging, low-rank keys/values with every token,
           a token method with low-rank keys) sized to each fraction of the full cache's bytes, on
           documents the basis never saw (calibration documents of the same corpus are skipped;
           an overlapping --text is refused). Writes DIR/compare.json (one row per configuration:
           config, family, bytes, fraction, slots, key_rank, ppl, per_document_ppl, ...), DIR/compare.csv
           and DIR/ppl_vs_bytes.html/.png with the Pareto front. Resumes like the perplexity command.
cost       per (layer, KV head): attention-output error of rank-r keys next to the head's key rank from
           the spectra, on held-out text: DIR/cost.json and DIR/rank_cost.html/.png.
"""

from __future__ import annotations

import csv
import io
import shutil

from tqdm.auto import tqdm

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.io import atomic_dir, check_out_dir, load_partial_settings, write_atomic, write_json
from analysis.jobs.basis import Basis
from analysis.lowrank.calibrate import calibrate, check_disjoint, held_out
from analysis.lowrank.compare import (
    MERGE_METHODS,
    TOKEN_METHODS,
    goal,
    pareto,
    parse_fractions,
    parse_key_specs,
    plan_configs,
    run_compare,
)
from analysis.lowrank.cost import KINDS as COST_KINDS
from analysis.lowrank.cost import rank_correlation, rank_costs
from analysis.models.loading import resolve_dtype
from analysis.options import parse_ints, parse_names
from analysis.perplexity.windows import make_windows
from analysis.report.export import write_figure
from analysis.report.lowrank import fig_ppl_vs_bytes, fig_rank_cost
from analysis.runtime.batching import Batching, check_batch_size
from analysis.runtime.capture import capture_sequences
from analysis.text.corpora import bos_id, load_documents, token_sequences
from experiments.common import (
    add_model_args,
    add_output_args,
    add_text_args,
    load_model_from_args,
    new_parser,
    run_main,
    text_source,
)


def _parser():
    parser = new_parser("lowrank", __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="calibrate|compare|cost")

    c = sub.add_parser("calibrate", help="fit a low-rank basis per (layer, KV head) on calibration text")
    add_model_args(c)
    add_text_args(c)
    c.add_argument("--documents", type=int, default=4, help="calibration documents (default: 4)")
    c.add_argument("--tokens", type=int, default=1024, help="tokens per document (default: 1024)")
    c.add_argument("--center", action="store_true", help="centre the keys (the mean is kept in the basis)")
    add_output_args(c)

    p = sub.add_parser("compare", help="perplexity of every family at equal cache bytes")
    add_model_args(p)
    add_text_args(p)
    p.add_argument("--basis", required=True, metavar="DIR", help="a basis directory (calibrate)")
    p.add_argument("--fractions", default="0.5,0.25,0.125", help="fractions of the full cache's bytes")
    p.add_argument("--held-out-from", action="append", metavar="DIR",
                   help="also set aside this basis's calibration documents, so that runs with bases from two "
                        "corpora evaluate the same documents (repeatable)")
    p.add_argument("--documents", type=int, default=4, help="held-out documents (default: 4)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per document (default: 1024)")
    p.add_argument("--window", type=int, default=1024, help="window W, stride W/2 (default: 1024)")
    p.add_argument("--methods", default=",".join(TOKEN_METHODS), help="token (eviction) methods")
    p.add_argument("--merge-methods", default=",".join(MERGE_METHODS), help="merging methods")
    p.add_argument("--combine", default="weightedkv,tova", help="token methods run with low-rank keys")
    p.add_argument("--key-ranks", default="8,16,0.99",
                   help="key settings of the lowrank and combined families: integers are ranks, fractions "
                        "per-head energies (default: 8,16,0.99)")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--recent", type=int, default=None, help="recent window (default: budget/2 - sinks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_output_args(p)

    k = sub.add_parser("cost", help="per-head attention-output error of rank-r keys vs the head's key rank")
    add_model_args(k)
    add_text_args(k)
    k.add_argument("--basis", required=True, metavar="DIR")
    k.add_argument("--ranks", default="4,8,16", help="key ranks to measure (default: 4,8,16)")
    k.add_argument("--sequences", type=int, default=1, help="held-out sequences (default: 1)")
    k.add_argument("--tokens", type=int, default=1024, help="tokens per sequence (default: 1024)")
    k.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_output_args(k)
    return parser


def _evaluation_docs(args, basis: Basis):
    """The source's documents without the basis's calibration documents; an overlap left over is refused."""
    docs = load_documents(**text_source(args))
    if "corpus" in text_source(args):  # the same corpus: skip the calibration documents
        docs = held_out(basis, docs)
    for other in getattr(args, "held_out_from", None) or []:  # another basis's documents too (paired runs)
        docs = held_out(Basis.load(other), docs)
    check_disjoint(basis, docs)
    if not docs:
        raise UserError("no documents left once the basis's calibration documents are set aside")
    return docs


def calibrate_command(args) -> None:
    if args.documents < 1 or args.tokens < 1:
        raise UserError("--documents and --tokens must be at least 1")
    check_out_dir(args.out, args.overwrite)
    docs = load_documents(**text_source(args))
    loaded = load_model_from_args(args)
    basis = calibrate(loaded, docs, text_source(args), args.tokens, args.documents, args.center, not args.quiet)
    basis.model = loaded.model_id
    with atomic_dir(args.out, args.overwrite) as tmp:
        basis.save(tmp)
    ranks = basis.ranks("key_pre_rope", energy=0.9).float().mean(), basis.ranks("value", energy=0.9).float().mean()
    print(f"basis of {len(basis.layers)} layers from {len(basis.calibration['documents'])} document(s): mean rank "
          f"at 90% energy {ranks[0]:.1f} (keys) and {ranks[1]:.1f} (values) of {basis.head_dim}")
    print(f"wrote {args.out}")


def compare_command(args) -> None:
    basis = Basis.load(args.basis)
    fractions = parse_fractions(args.fractions)
    check_batch_size(args.batch_size)
    if args.tokens < args.window:
        raise UserError(f"--tokens {args.tokens} is shorter than --window {args.window}")
    size = resolve_dtype(args.dtype).itemsize
    configs = plan_configs(fractions, basis.head_dim, args.window, element_size=size,
                           token_methods=parse_names(args.methods), merge_methods=parse_names(args.merge_methods),
                           combine_methods=parse_names(args.combine), key_specs=parse_key_specs(args.key_ranks, basis),
                           sinks=args.sinks)
    out = check_out_dir(args.out, args.overwrite)
    partial = out.parent / f".{out.name}.partial"
    if args.overwrite:
        shutil.rmtree(partial, ignore_errors=True)
    docs = _evaluation_docs(args, basis)
    loaded = load_model_from_args(args)
    basis.check(loaded.model)
    sequences = token_sequences(loaded.tokenizer, docs, args.tokens, args.documents)
    windows = make_windows(sequences, args.window, bos_id(loaded.tokenizer))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "quiet", "no_png", "batch_size")}
    load_partial_settings(partial, settings)
    bar = tqdm(total=len(configs) * len(windows.docs), unit="run-window", desc="compare", disable=args.quiet)
    rows = run_compare(loaded, windows, basis, configs, fractions=fractions,
                       options=PolicyOptions(args.sinks, args.recent, args.seed),
                       batching=Batching(args.batch_size, partial, bar.update))
    bar.close()
    result = {"model": loaded.model_id, "basis": str(args.basis), "calibration": basis.calibration,
              "center": basis.center, "source": text_source(args), "documents": list(dict.fromkeys(windows.docs)),
              "tokens": args.tokens, "window": args.window, "fractions": fractions, "dtype": args.dtype,
              "sinks": args.sinks, "recent": args.recent, "seed": args.seed, "rows": rows, "pareto": pareto(rows),
              "goal": [goal(rows, f) for f in fractions]}
    with atomic_dir(out, args.overwrite) as tmp:
        write_json(tmp / "compare.json", result)
        write_atomic(tmp / "compare.csv", _csv(rows).encode())
        write_figure(fig_ppl_vs_bytes(result), tmp, "ppl_vs_bytes", png=not args.no_png)
    shutil.rmtree(partial, ignore_errors=True)
    for r in sorted(rows, key=lambda r: (-r["fraction"], r["ppl"])):
        print(f"{r['family']:>9} {r['config']:>24} {r['fraction']:.3f} of the bytes  ppl {r['ppl']:.3f}")
    for g in result["goal"]:
        if g["met"] is not None:
            print(f"at {g['fraction']}: best channel {g['best_channel']} {g['best_channel_ppl']:.3f} vs best token "
                  f"{g['best_token']} {g['best_token_ppl']:.3f} ({'met' if g['met'] else 'missed'})")
    print(f"wrote {out}")


def _csv(rows: list[dict]) -> str:
    fields = ["config", "family", "method", "bytes", "fraction", "target_fraction", "slots", "key_rank",
              "value_rank", "ppl"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def cost_command(args) -> None:
    basis = Basis.load(args.basis)
    ranks = parse_ints(args.ranks, "ranks")
    for r in ranks:
        if not 1 <= r <= basis.head_dim:
            raise UserError(f"--ranks: {r} is out of 1..{basis.head_dim}")
    if args.tokens < basis.head_dim or args.sequences < 1:
        raise UserError(f"--tokens must be at least head_dim={basis.head_dim} and --sequences at least 1")
    check_out_dir(args.out, args.overwrite)
    docs = _evaluation_docs(args, basis)
    loaded = load_model_from_args(args)
    basis.check(loaded.model)
    sequences = token_sequences(loaded.tokenizer, docs, args.tokens, args.sequences)
    capture = capture_sequences(loaded, sequences, kinds=COST_KINDS, progress=not args.quiet)
    rows = rank_costs(loaded.model, capture, basis, ranks)
    result = {"model": loaded.model_id, "basis": str(args.basis), "source": text_source(args),
              "sequences": [i for i, _ in sequences], "tokens": args.tokens, "ranks": ranks, "rows": rows,
              "correlation": {str(r): rank_correlation(rows, r) for r in ranks}}
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_json(tmp / "cost.json", result)
        write_figure(fig_rank_cost(result), tmp, "rank_cost", png=not args.no_png)
    for r in ranks:
        errors = [row["output_error"] for row in rows if row["rank"] == r]
        print(f"rank {r}: mean output error {sum(errors) / len(errors):.4f}, Spearman with key rank "
              f"{result['correlation'][str(r)]:.2f}")
    print(f"wrote {args.out}")


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    {"calibrate": calibrate_command, "compare": compare_command, "cost": cost_command}[args.command](args)


if __name__ == "__main__":
    run_main(main)
