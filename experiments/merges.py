"""The merge design space: which merge, if any, beats its own eviction, and why (issue 17).

    python -m experiments.merges --out DIR [--budget 64,128,256] [--documents 8] [--tokens 512 --window 512]

Stages (each resumable from a hidden .DIR.partial beside DIR):
1. selection: every variant (--variants, default the factorial target x weights x what plus the presets,
   CaM and WeightedKV with a depth cap) and its own eviction ablation (weightedkv_evict, or streaming_llm
   for CaM) on the --select corpora (books, web), paired per (corpus, document, budget);
2. the --top best variants on selection (win rate, ties: mean paired difference) are confirmed on the
   --confirm corpora (latex, math): documents the choice never saw;
3. end-to-end KL(full || compressed) of every variant at the smallest budget on --kl-documents documents
   of each selection corpus (0: skip);
4. the cascade: --cascade-tokens tokens (0: skip) of --cascade-documents books streams at --cascade-budget,
   WeightedKV with and without a depth cap, from the cache's mixing record.

A variant is any merging method name: a preset (keepkv_like, d2o_like, mergingpress_like, asymkv_like,
weightedkv_similar, cam, weightedkv) or a point merge:target=similar,weights=attention,what=value,cap=2
(see analysis/compress/merge_parts.py). Writes DIR/merges.json ({"rows": [one per (variant, budget,
corpus): variant, budget, corpus, ppl, evict_ppl, wins, cells, p_value, mean_diff, std_diff, evict, split,
kl, evict_kl], "selection", "confirmation", "cascade", settings}), DIR/space.html/.png, DIR/cascade.html/.png.
"""

from __future__ import annotations

import shutil

from tqdm.auto import tqdm

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.io import atomic_dir, check_out_dir, load_partial_settings, write_json
from analysis.jobs.job import make_jobs
from analysis.merges.space import CASCADE_VARIANTS, VARIANTS, ablation, check_variants, choose, pooled
from analysis.merges.study import run_cascade, run_kl, run_space
from analysis.options import parse_ints, parse_names
from analysis.perplexity.table1 import window_count
from analysis.report.export import write_figure
from analysis.report.merges import fig_cascade, fig_space
from analysis.runtime.batching import Batching
from analysis.text.corpora import CORPORA
from experiments.common import add_model_args, add_output_args, load_model_from_args, new_parser, run_main


def parser():
    p = new_parser("merges", __doc__)
    add_model_args(p)
    p.add_argument("--variants", default=",".join(VARIANTS), help="merging method names (default: the space)")
    p.add_argument("--budget", default="64,128,256", help="cache sizes m (default: 64,128,256)")
    p.add_argument("--select", default="books,web", help="corpora the best variant is chosen on")
    p.add_argument("--confirm", default="latex,math", help="corpora it is confirmed on (never seen by the choice)")
    p.add_argument("--documents", type=int, default=8, help="documents per corpus (default: 8)")
    p.add_argument("--tokens", type=int, default=512, help="tokens per document (default: 512)")
    p.add_argument("--window", type=int, default=512, help="perplexity window (default: 512)")
    p.add_argument("--top", type=int, default=3, help="variants confirmed (default: 3; 0: selection only)")
    p.add_argument("--kl-documents", type=int, default=1, help="documents per selection corpus for KL (0: skip)")
    p.add_argument("--cascade-tokens", type=int, default=8192, help="stream length of the cascade (0: skip)")
    p.add_argument("--cascade-documents", type=int, default=1, help="books streams in the cascade (default: 1)")
    p.add_argument("--cascade-budget", type=int, default=128, help="cache size of the cascade (default: 128)")
    p.add_argument("--cascade-variants", default=",".join(CASCADE_VARIANTS), help="variants in the cascade")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--recent", type=int, default=None, help="protected newest tokens (default: budget // 2 - sinks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32, help="rows decoded together (default: 32)")
    p.add_argument("--no-png", action="store_true", help="write HTML only")
    add_output_args(p)
    return p


def _corpora(text: str, name: str) -> list[str]:
    names = parse_names(text)
    bad = [c for c in names if c not in CORPORA]
    if bad or not names:
        raise UserError(f"--{name}: unknown corpus {', '.join(bad) or '(none)'}; choose from {', '.join(CORPORA)}")
    return names


def check(args) -> dict:
    """Every option checked before the model loads: one-line errors."""
    variants = check_variants(parse_names(args.variants))
    cascade = check_variants(parse_names(args.cascade_variants)) if args.cascade_tokens else []
    budgets = parse_ints(args.budget, "budget")
    select, confirm = _corpora(args.select, "select"), _corpora(args.confirm, "confirm")
    if set(select) & set(confirm):
        raise UserError(f"--select and --confirm share {', '.join(sorted(set(select) & set(confirm)))}: "
                        "the confirmation must be on corpora the choice never saw")
    if args.documents < 1 or min(args.top, args.kl_documents, args.cascade_tokens, args.cascade_documents) < 0:
        raise UserError("--documents must be at least 1; --top, --kl-documents, --cascade-* not negative")
    if args.tokens < args.window:
        raise UserError(f"--tokens {args.tokens} is shorter than --window {args.window}")
    if max(budgets) >= args.window:
        raise UserError(f"budget {max(budgets)} >= window {args.window}: nothing is ever compressed")
    if args.cascade_tokens and args.cascade_budget >= args.cascade_tokens:
        raise UserError(f"--cascade-budget {args.cascade_budget} >= --cascade-tokens {args.cascade_tokens}")
    options = PolicyOptions(args.sinks, args.recent, args.seed)
    make_jobs([*variants, *(ablation(v) for v in variants)], budgets, options)  # bad budget splits: one line
    return {"variants": variants, "cascade": cascade, "budgets": budgets, "select": select, "confirm": confirm,
            "options": options}


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    c = check(args)
    out = check_out_dir(args.out, args.overwrite)
    partial = out.parent / f".{out.name}.partial"
    if args.overwrite:
        shutil.rmtree(partial, ignore_errors=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "quiet", "no_png", "batch_size")}
    # A resumed run may change what is done after the sweeps: their per-window results do not depend on it.
    load_partial_settings(partial, settings, ignore=("top", "kl_documents", "cascade_tokens", "cascade_documents",
                                                     "cascade_budget", "cascade_variants"))
    loaded = load_model_from_args(args)
    n_jobs = 2 * len(c["variants"]) * len(c["budgets"])
    windows = window_count(args.tokens, args.window)
    total = n_jobs * windows * args.documents * (len(c["select"]) + len(c["confirm"]) * args.top / len(c["variants"]))
    bar = tqdm(total=int(total), unit="window", desc="merge space", disable=args.quiet)
    batching = lambda name: Batching(args.batch_size, partial / name, bar.update)  # noqa: E731
    sizes = {"tokens": args.tokens, "documents": args.documents, "window": args.window, "options": c["options"]}
    table, rows = run_space(loaded, c["select"], c["variants"], c["budgets"], batching=batching("select"),
                            split="selection", **sizes)
    best = choose(rows, c["variants"], c["select"], top=args.top)
    chosen = [b["variant"] for b in best]
    confirm_rows = []
    if chosen:  # --top 0: the selection only (no confirmation: say so when reporting it)
        _, confirm_rows = run_space(loaded, c["confirm"], chosen, c["budgets"], batching=batching("confirm"),
                                    split="confirmation", **sizes)
    bar.close()
    rows += confirm_rows
    kl = {}
    if args.kl_documents:
        kl = run_kl(loaded, c["select"], c["variants"], min(c["budgets"]), tokens=args.window,
                    documents=args.kl_documents, options=c["options"])
        for r in rows:
            if r["budget"] == min(c["budgets"]) and r["split"] == "selection":
                r |= {"kl": kl[r["variant"]]["kl"], "evict_kl": kl[r["evict"]]["kl"]}
    cascade = None
    if args.cascade_tokens:
        cascade = run_cascade(loaded, "books", c["cascade"], args.cascade_budget, tokens=args.cascade_tokens,
                              documents=args.cascade_documents, options=c["options"])
    result = {"model": loaded.model_id, "settings": settings, "budgets": c["budgets"], "spread": "population std",
              "rows": rows, "kl": kl,
              "selection": {"corpora": c["select"], "ranking": [pooled(rows, v, c["select"]) for v in c["variants"]],
                            "chosen": chosen},
              "confirmation": {"corpora": c["confirm"], "results": [pooled(confirm_rows, v, c["confirm"])
                                                                    for v in chosen]},
              "cascade": cascade}
    with atomic_dir(out, args.overwrite) as tmp:
        write_json(tmp / "merges.json", result)
        write_figure(fig_space(result), tmp, "space", png=not args.no_png)
        if cascade is not None:
            write_figure(fig_cascade(cascade), tmp, "cascade", png=not args.no_png)
    shutil.rmtree(partial, ignore_errors=True)
    for b in result["confirmation"]["results"]:
        print(f"{b['variant']}: beats its eviction in {b['wins']} of {b['cells']} confirmation cells "
              f"(p = {b['p_value']:.3g}, mean paired difference {b['mean_diff']})")


if __name__ == "__main__":
    run_main(main)
