"""Which heads to compress: profile every (layer, KV head), plan per-head budgets, evaluate on unseen text.

    python -m experiments.heads profile --corpus books --tokens 1024 --documents 4 --out runs/heads
    python -m experiments.heads plan --profile runs/heads --total-budget 128x --out runs/heads-plan
    python -m experiments.heads evaluate --plan runs/heads-plan/plan.json --corpus books --skip 4 \\
        --documents 2 --tokens 2048 --window 1024 --out runs/heads-eval

profile writes DIR/profile.json (one row per (layer, kv_head): every measure and the sensitivity
rank; see analysis/heads/profile.py) and figures; plan writes DIR/plan.json (the JSON CompressedCache and
``experiments.perplexity --plan`` accept; rule in analysis/heads/allocate.py) and its budget heatmap;
evaluate writes DIR/evaluation.json with the plan and its baselines (uniform, per-layer, random, and
the controls uniform-evict, budgets-merge, budgets-evict; analysis/heads/allocate.py) at the plan's
total memory, per corpus, with per-document perplexity. Evaluation documents that come
from the profiled documents are refused, and so is a plan file with no ``profile`` block (nothing to
check against) unless --no-profile-check, which evaluation.json records as ``profile_check: false``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm.auto import tqdm

from analysis.errors import UserError
from analysis.heads.allocate import baseline, greedy_plan, parse_total
from analysis.heads.evaluate import (
    comparison,
    evaluate_plans,
    evaluation_options,
    evaluation_sequences,
    profiled_ids,
)
from analysis.heads.profile import check_methods, profile_sequences, summary_lines
from analysis.io import atomic_dir, check_out_dir, write_json
from analysis.jobs.plan import Plan
from analysis.models.loading import compressed_layers, model_id_of
from analysis.perplexity.windows import make_windows
from analysis.report.export import write_figure
from analysis.report.heads import fig_evaluation, fig_plan_heatmap
from analysis.report.save import save_profile
from analysis.text.corpora import bos_id, load_documents, token_sequences
from experiments.common import (
    add_model_args,
    add_output_args,
    add_text_args,
    load_model_from_args,
    new_parser,
    parse_ints,
    run_main,
    text_source,
)


def _parser() -> argparse.ArgumentParser:
    parser = new_parser("heads", __doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="profile|plan|evaluate")

    p = sub.add_parser("profile", help="measure every (layer, KV head) on profiling text",
                       description="Head profile: teacher-forced errors, merge-minus-evict, ranks, "
                                   "attention statistics.")
    add_model_args(p)
    add_text_args(p)
    p.add_argument("--tokens", type=int, default=1024, help="tokens per profiling document (default: 1024)")
    p.add_argument("--documents", type=int, default=4, help="profiling documents (default: 4)")
    p.add_argument("--skip", type=int, default=0, help="skip the corpus's first N documents (default: 0)")
    p.add_argument("--budgets", default="32,64,128,256",
                   help="budgets of the teacher-forced sweep (default: 32,64,128,256)")
    p.add_argument("--methods", default="weightedkv,weightedkv_evict",
                   help="methods of the sweep; must include weightedkv and weightedkv_evict (default: those two)")
    p.add_argument("--sinks", type=int, default=4, help="attention sinks (default: 4)")
    p.add_argument("--recent-window", type=int, default=60,
                   help="tokens counted as 'recent' in the attention shares (default: 60 = 128/2 - 4)")
    p.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_output_args(p)

    q = sub.add_parser("plan", help="per-head budgets from a profile at a total memory",
                       description="Greedy water-filling of per-head budgets on the profile's error curves.")
    q.add_argument("--profile", required=True, metavar="DIR", help="a profile directory (profile.json)")
    q.add_argument("--total-budget", required=True, metavar="SLOTS",
                   help="sum of all head budgets: an integer, or e.g. 128x = 128 slots per head on average")
    q.add_argument("--max-budget", type=int, default=None,
                   help="largest budget one head may get (default: profiled tokens - 1)")
    q.add_argument("--name", default=None, help="plan name (default: greedy-<mean>x)")
    q.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_output_args(q)

    e = sub.add_parser("evaluate", help="perplexity of a plan vs uniform, per-layer and random at equal memory",
                       description="Perplexity of a plan and its baselines on text the profile never saw.")
    add_model_args(e)
    add_text_args(e)
    e.add_argument("--plan", required=True, metavar="FILE", help="a plan.json (from the plan command)")
    e.add_argument("--tokens", type=int, default=2048, help="tokens per document (default: 2048)")
    e.add_argument("--documents", type=int, default=2, help="documents per corpus (default: 2)")
    e.add_argument("--skip", type=int, default=0, help="skip each corpus's first N documents (default: 0)")
    e.add_argument("--window", type=int, default=1024, help="window W, stride W/2 (default: 1024)")
    e.add_argument("--baselines", default="uniform,layer,random",
                   help="comma list of uniform, layer, random and the controls uniform-evict, budgets-merge, "
                        "budgets-evict (default: uniform,layer,random)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: 0)")
    e.add_argument("--batch-size", type=int, default=32, help="windows decoded together (default: 32)")
    e.add_argument("--no-profile-check", action="store_true",
                   help="evaluate a plan file that has no 'profile' block (its profiled documents are unknown, so "
                        "overlap with the evaluation text is not checked; recorded as profile_check: false)")
    e.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_output_args(e)
    return parser


def profile(args) -> None:


    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    budgets = parse_ints(args.budgets, "budgets")
    if args.skip < 0:
        raise UserError(f"--skip must be at least 0, got {args.skip}")
    if any(not args.sinks < b < args.tokens for b in budgets):
        raise UserError(f"--budgets must lie between --sinks {args.sinks} and --tokens {args.tokens}")
    check_out_dir(args.out, args.overwrite)
    source = text_source(args)
    docs = load_documents(**source)[args.skip:]
    loaded = load_model_from_args(args)
    sequences = token_sequences(loaded.tokenizer, docs, args.tokens, args.documents)
    layers = compressed_layers(loaded.model.config)  # sliding-window layers are not compressed, not profiled
    bar = tqdm(total=2 * len(layers), unit="layer", desc="profile", disable=args.quiet)
    result = profile_sequences(loaded, sequences, source, methods, budgets, args.sinks, args.recent_window,
                               skip=args.skip, capture_progress=not args.quiet, progress=bar.update)
    bar.close()
    save_profile(args.out, result, overwrite=args.overwrite, png=not args.no_png)
    for line in summary_lines(result["summary"]):
        print(line)
    top = sorted(result["rows"], key=lambda r: r["rank"])[:3]
    print("most sensitive heads: " + ", ".join(f"L{r['layer']}H{r['kv_head']} ({r['sensitivity']:.3f})" for r in top))
    print(f"wrote {args.out}")


def load_profile(path: str | Path) -> dict:

    f = Path(path) / "profile.json"
    if not f.is_file():
        raise UserError(f"--profile {path} holds no profile.json (run `python -m experiments.heads profile` first)")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{f} is not valid JSON ({err})") from None


def plan(args) -> None:

    prof = load_profile(args.profile)
    heads = len(prof["layers"]) * prof["num_kv_heads"]
    total = parse_total(args.total_budget, heads)
    check_out_dir(args.out, args.overwrite)
    name = args.name or f"greedy-{total / heads:g}x"
    result = greedy_plan(prof, total, sinks=prof["sinks"], max_budget=args.max_budget, name=name, model=prof["model"])
    data = result.to_json() | {"profile": {"dir": str(args.profile), "text_ids": prof["text_ids"],
                                           "source": prof.get("source"), "budgets": prof["budgets"]}}
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_json(tmp / "plan.json", data)
        write_figure(fig_plan_heatmap(result), tmp, "plan_budgets", png=not args.no_png)
    merged = sum(map(sum, result.merge))
    print(f"plan {name}: {result.total_slots} of {total} slots, budgets {result.min_budget}..{result.max_budget}, "
          f"{merged} of {heads} heads merge")
    print(f"wrote {args.out}")


def evaluate(args) -> None:


    plan_ = Plan.load(args.plan)
    plan_.check_model(model_id_of(args.model))
    raw = json.loads(Path(args.plan).read_text())
    profile_ids, profile_check = profiled_ids(raw, args.plan, allow_missing=args.no_profile_check)
    names = evaluation_options(plan_, args.baselines, args.tokens, args.window)
    check_out_dir(args.out, args.overwrite)
    source = text_source(args)
    sources = ([{"corpus": c.strip()} for c in source["corpus"].split(",") if c.strip()]
               if "corpus" in source else [source])
    loaded = load_model_from_args(args)
    plan_.check(loaded.model.config)
    plans = [baseline(n, plan_, cap=args.window - 1, seed=args.seed) for n in names] + [plan_]
    texts = []
    for src in sources:  # every split is checked before any evaluation runs
        seqs = evaluation_sequences(loaded.tokenizer, src, args.tokens, args.documents, args.skip, profile_ids)
        texts.append((src, make_windows(seqs, args.window, bos_id(loaded.tokenizer))))
    bar = tqdm(total=sum(len(w.docs) for _, w in texts) * len(plans), unit="run-window", desc="evaluate",
               disable=args.quiet)
    results = []
    for src, windows in texts:
        results += evaluate_plans(loaded, windows, plans, src, args.tokens, args.documents, args.batch_size,
                                  progress=bar.update, seed=args.seed)
    bar.close()
    summary = {"model": loaded.model_id, "plan_file": str(args.plan), "plan": plan_.name, "window": args.window,
               "tokens": args.tokens, "documents": args.documents, "skip": args.skip, "profile_text_ids": profile_ids,
               "profile_check": profile_check,
               "results": results, "comparison": comparison(results)}
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_json(tmp / "evaluation.json", summary)
        write_figure(fig_evaluation(summary), tmp, "evaluation", png=not args.no_png)
    for r in results:
        print(f"{r['corpus']:>8} {r['plan']:>16} {r['total_slots']:>6} slots  ppl {r['ppl']:.3f}")
    for c in summary["comparison"]:
        print(f"{c['corpus']:>8} {c['plan']:>16} vs uniform {c['ppl_change_percent']:+.2f}% "
              f"(documents {c['best_document']:+.2f}% .. {c['worst_document']:+.2f}%)")
    print(f"wrote {args.out}")


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    {"profile": profile, "plan": plan, "evaluate": evaluate}[args.command](args)


if __name__ == "__main__":
    run_main(main)
