"""``python -m experiments.perplexity --stream``: the stream half of the perplexity command (Fig. 4).

Kept apart so the windowed sweep stays as it is; the options are those of experiments.perplexity.
"""

from __future__ import annotations

import os
import shutil

from tqdm.auto import tqdm

from analysis.compress import PolicyOptions, make_jobs
from analysis.errors import UserError
from analysis.io import check_out_dir, load_partial_settings
from analysis.models.loading import resolve_dtype
from analysis.perplexity.jobs import Batching
from analysis.perplexity.settings import (
    STREAM_METHODS,
    bytes_budget,
    check_batch_size,
    parse_methods,
    plan_and_budgets,
    with_lowrank,
)
from analysis.perplexity.stream import check_stream_length, run_stream
from analysis.report.save import save_stream
from analysis.text.corpora import load_documents, token_sequences
from experiments.common import load_model_from_args, text_source

STREAM_DOCUMENTS = 4


def main_stream(args, lowrank=None) -> None:
    """``lowrank``: the --key-basis options (``experiments.perplexity.equal_bytes``), None for full keys."""


    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--stream runs in one process (its documents are batch rows): run it without torchrun")
    methods = parse_methods(args.methods, STREAM_METHODS)
    plan, budgets = plan_and_budgets(args.budget, args.plan, args.total_budget)
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
    if args.bytes is not None and lowrank is None:  # the head dimension is known now
        budgets = [bytes_budget(args.bytes, loaded.summary()["head_dim"], resolve_dtype(args.dtype).itemsize,
                                None, args.sinks)]
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
