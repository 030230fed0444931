"""Sliding-window perplexity under compressed KV caches (the WeightedKV paper's Table I and Fig. 4).

    python -m experiments.perplexity --model default --corpus books --tokens 4096 --window 1024 \\
        --budget 128,256 --methods weightedkv,weightedkv_evict,h2o,tova,cam,streaming_llm --out DIR

Writes DIR/perplexity.json, DIR/table.csv, DIR/table.md, DIR/nll.safetensors and figures
(HTML + PNG). A killed run resumes where it stopped: each finished (method, budget, window) is kept
in a hidden .DIR.partial directory beside DIR until the whole sweep is written.

Per-head budgets: --plan FILE (see analysis/jobs/plan.py) replaces --budget. More than one process:
    torchrun --nproc-per-node 2 -m experiments.perplexity ...   (windows are shared out; rank 0 writes)
Models larger than one device: --device-map auto (accelerate) spreads the layers.

One long stream per document (the paper's Fig. 4), decoded token by token, never restarted:
    python -m experiments.perplexity --stream --corpus books --documents 4 --budget 128 --out DIR
--tokens defaults to the model's positions (8192 for the embedded model); --window is not used;
--methods defaults to weightedkv,weightedkv_evict. Writes DIR/stream.json, DIR/nll.safetensors and
DIR/running_log_ppl.html/.png (mean ± spread over documents); resumes like a sweep.
"""

from __future__ import annotations

import argparse
import os
import shutil

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from analysis.errors import UserError
from analysis.io import check_out_dir, load_partial_settings
from analysis.models.loading import model_id_of
from analysis.perplexity.settings import sweep_settings, with_lowrank
from analysis.perplexity.sweep import run_sweep
from analysis.perplexity.windows import make_windows
from analysis.report.save import save_sweep
from analysis.runtime.batching import Batching
from analysis.text.corpora import bos_id, load_documents, token_sequences
from experiments.common import (
    add_lowrank_args,
    add_output_args,
    bytes_slots,
    command_parser,
    equal_bytes,
    load_model_from_args,
    run_main,
    text_source,
)
from experiments.perplexity_stream import main_stream


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("perplexity", __doc__)
    parser.add_argument("--stream", action="store_true",
                        help="one stream per document through one cache, no windows (Fig. 4); see above")
    parser.add_argument("--tokens", type=int, default=None,
                        help="tokens per document (default: 4096; --stream: the model's positions)")
    parser.add_argument("--documents", type=int, default=None,
                        help="documents to evaluate (default: 1; --stream: 4, as batch rows)")
    parser.add_argument("--window", type=int, default=1024, help="window W, stride W/2 (default: 1024)")
    parser.add_argument("--budget", default="128,256", help="cache sizes m per layer (default: 128,256)")
    parser.add_argument("--methods", default=None,
                        help="comma list; 'full' adds the uncompressed reference (default: all compressing; "
                             "--stream: weightedkv,weightedkv_evict); also presets such as keepkv_like, tova_orig "
                             "and merge-space points merge:target=similar,cap=2 (analysis/compress/registry.py)")
    parser.add_argument("--sinks", type=int, default=4, help="attention sinks kept (default: 4)")
    parser.add_argument("--recent", type=int, default=None, help="recent window (default: budget/2 - sinks)")
    parser.add_argument("--seed", type=int, default=0, help="seed of cam and random (default: 0)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows decoded together: windows, and a sweep's jobs when windows are few (default: 32)")
    parser.add_argument("--plan", default=None, metavar="FILE",
                        help="per-(layer, KV head) budgets from a plan JSON file, instead of --budget")
    parser.add_argument("--total-budget", type=int, default=None, metavar="SLOTS",
                        help="refuse a --plan holding more slots than this in all")
    low = add_lowrank_args(parser)
    low.add_argument("--bytes", type=float, default=None, metavar="B",
                     help="equal bytes: cache bytes per (layer, KV head) instead of --budget; m = B / (2 d dtype) "
                          "slots, B / ((r + d) dtype) with rank-r keys")
    parser.add_argument("--device-map", default=None, help="'auto': spread the layers over the devices (accelerate)")
    parser.add_argument("--no-png", action="store_true", help="write figures as HTML only")
    add_output_args(parser)
    return parser


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world size): torchrun sets WORLD_SIZE; gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    lowrank, bytes_budgets = equal_bytes(args)
    if args.stream:
        return main_stream(args, lowrank, bytes_budgets)
    args.tokens = 4096 if args.tokens is None else args.tokens
    args.documents = 1 if args.documents is None else args.documents
    sweep = sweep_settings(args.methods, args.budget if bytes_budgets is None else bytes_budgets, args.tokens,
                           args.window, sinks=args.sinks, recent=args.recent, seed=args.seed, plan_file=args.plan,
                           total_budget=args.total_budget, batch_size=args.batch_size)
    plan, jobs = sweep.plan, with_lowrank(sweep.jobs, lowrank)
    if plan is not None:
        plan.check_model(model_id_of(args.model))  # a plan of the other built-in model: before it loads
    rank, world = _distributed(args.device)
    out = check_out_dir(args.out, args.overwrite)
    partial = out.parent / f".{out.name}.partial"
    if args.overwrite and rank == 0:
        shutil.rmtree(partial, ignore_errors=True)

    docs = load_documents(**text_source(args))
    loaded = load_model_from_args(args, device_map=args.device_map)
    if lowrank is not None:
        lowrank.basis.check(loaded.model)
    if bytes_budgets == []:  # --bytes without a basis: the model's head dimension is known now
        sweep = sweep.at_budgets(bytes_slots(args, loaded.summary()["head_dim"]))
        jobs = with_lowrank(sweep.jobs, lowrank)
    if plan is not None:
        plan.check(loaded.model.config)
    if loaded.summary()["max_positions"] and args.window > loaded.summary()["max_positions"]:
        raise UserError(f"--window {args.window} exceeds the model's {loaded.summary()['max_positions']} positions")
    sequences = token_sequences(loaded.tokenizer, docs, args.tokens, args.documents)
    windows = make_windows(sequences, args.window, bos_id(loaded.tokenizer))
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "overwrite", "quiet", "no_png")}
    settings["plan"] = plan.to_json() if plan is not None else None
    if bytes_budgets is not None:  # the budget --bytes bought, as a resumed run's --budget is compared
        settings["budget"] = ",".join(map(str, sweep.budgets))
    # every rank checks a resumed run's settings; rank 0 records new ones, and the others wait for it
    load_partial_settings(partial, settings, ignore=("batch_size",), write=rank == 0)
    _barrier(world)

    mine = len(range(rank, len(windows.docs), world))
    bar = tqdm(total=len(jobs) * mine, unit="run-window", desc="perplexity", disable=args.quiet or rank > 0)
    batching = Batching(args.batch_size, partial, bar.update, rank, world)
    summary, tensors = run_sweep(loaded, windows, jobs, source=text_source(args), tokens=args.tokens,
                                 documents=args.documents, batching=batching, on_job=bar.set_postfix_str)
    bar.close()
    if rank > 0:
        return
    save_sweep(out, summary, tensors, overwrite=args.overwrite, png=not args.no_png)
    shutil.rmtree(partial, ignore_errors=True)
    for r in summary["results"]:
        print(f"{r['method']:>16} m={r['budget']:<5} ppl {r['ppl']:.3f}  ({r['tokens']} tokens, {r['seconds']:.1f} s)")
    print(f"wrote {out}")


def _barrier(world: int) -> None:
    if world > 1:

        dist.barrier()


if __name__ == "__main__":
    run_main(main)
