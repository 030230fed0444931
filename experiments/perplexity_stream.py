"""``python -m experiments.perplexity --stream``: the stream half of the perplexity command (Fig. 4).

Kept apart so the windowed sweep stays as it is; the options are those of experiments.perplexity.
"""

from __future__ import annotations

import os
import shutil

from tqdm.auto import tqdm

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.io import check_out_dir, load_partial_settings
from analysis.jobs.job import make_jobs
from analysis.perplexity.settings import STREAM_METHODS, parse_methods, plan_and_budgets, with_lowrank
from analysis.perplexity.stream import check_stream_length, run_stream
from analysis.report.save import save_stream
from analysis.runtime.batching import Batching, check_batch_size
from analysis.text.corpora import load_documents, token_sequences
from experiments.common import bytes_slots, load_model_from_args, text_source

STREAM_DOCUMENTS = 4


def main_stream(args, lowrank=None, bytes_budgets: list[int] | None = None) -> None:
    """``lowrank``, ``bytes_budgets``: the --key-basis and --bytes options (``experiments.common.equal_bytes``)."""


    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--stream runs in one process (its documents are batch rows): run it without torchrun")
    methods = parse_methods(args.methods, STREAM_METHODS)
    plan, budgets = plan_and_budgets(args.budget if bytes_budgets is None else bytes_budgets, args.plan,
                                     args.total_budget)
    options = PolicyOptions(args.sinks, args.recent, args.seed)
    make_jobs(methods, budgets, options, plan)  # bad methods and budgets: one line, before the model loads
    documents = STREAM_DOCUMENTS if args.documents is None else args.documents
    if documents < 1:
        raise UserError(f"--documents must be at least 1, got {documents}")
    check_batch_size(args.batch_size)
    if args.tokens is not None:
        check_stream_length(args.tokens, None)  # the model's limit is checked once it is loaded
    out = check_out_dir(args.out, args.overwrite)
    partial = out.parent / f".{out.name}.partial"
    if args.overwrite:
        shutil.rmtree(partial, ignore_errors=True)

    docs = load_documents(**text_source(args))
    loaded = load_model_from_args(args, device_map=args.device_map)
    if lowrank is not None:
        lowrank.basis.check(loaded.model)
    if bytes_budgets == []:  # --bytes without a basis: the model's head dimension is known now
        budgets = bytes_slots(args, loaded.summary()["head_dim"])
    if plan is not None:
        plan.check(loaded.model.config)
    max_positions = loaded.summary()["max_positions"]
    if args.tokens is None and not max_positions:
        raise UserError("the model states no position limit: give --tokens")
    tokens = args.tokens if args.tokens is not None else max_positions
    check_stream_length(tokens, max_positions)

    jobs = with_lowrank(make_jobs(methods, budgets, options, plan, window=tokens), lowrank)  # and the stream's length
    sequences = token_sequences(loaded.tokenizer, docs, tokens, documents)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "quiet", "no_png")}
    if bytes_budgets is not None:  # the budget --bytes bought, as a resumed run's --budget is compared
        settings["budget"] = ",".join(map(str, budgets))
    settings |= {"tokens": tokens, "documents": documents, "methods": methods,
                 "plan": plan.to_json() if plan is not None else None}
    load_partial_settings(partial, settings, ignore=("batch_size",))
    bar = tqdm(total=len(jobs) * len(sequences), unit="stream", desc=f"stream {tokens} tokens", disable=args.quiet)
    summary, tensors = run_stream(loaded, sequences, jobs, source=text_source(args),
                                  batching=Batching(args.batch_size, partial, bar.update))
    bar.close()
    save_stream(out, summary, tensors, overwrite=args.overwrite, png=not args.no_png)
    shutil.rmtree(partial, ignore_errors=True)
    for r in summary["results"]:
        print(f"{r['method']:>16} m={r['budget']:<5} ppl {r['ppl']:.3f}  (nll {r['nll_mean']:.4f} ± "
              f"{r['nll_spread']:.4f} over {summary['documents']} documents, {r['seconds']:.1f} s)")
    print(f"wrote {out}")
