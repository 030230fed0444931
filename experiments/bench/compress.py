"""Benchmarks of the compression core (ratios within one run; results go to docs/benchmarks.md).

    python -m experiments.bench.compress step        # decode step per method vs streaming_llm / full
    python -m experiments.bench.compress memory      # cache bytes and peak RSS from 1k to 8k tokens
    python -m experiments.bench.compress throughput --batch 15   # batched evaluator (15 windows) vs naive loop
    python -m experiments.bench.compress profile --batch 32   # where a decode step's time goes
    python -m experiments.bench.compress fullstep --batch 32  # compressed step vs full-cache step, same slots
    python -m experiments.bench.compress sweep       # a 1-window sweep: jobs as batch rows vs one by one
    python -m experiments.bench.compress heads --window 256 --budget 32   # heads evaluate: plans as rows
    python -m experiments.bench.compress rows --window 256 --budget 32 --ks 2,4   # packing vs the model's batching
    python -m experiments.bench.compress prompt      # generate() after a long prompt, compressed vs full
    python -m experiments.bench.compress prefill     # peak memory of a chunked 4k-token prefill (subprocess)
    python -m experiments.bench.compress cache --batch 32   # cache management alone: append+observe+compress
    python -m experiments.bench.compress cache --budget 256 --methods streaming_llm,weightedkv,weightedkv_similar
    python -m experiments.bench.compress camprompt   # peak memory of CaM's long-prompt pass (subprocess)
    python -m experiments.bench.compress perturb --window 1024 --budgets 128,256  # sweep vs perplexity run

Every timing is the median of interleaved repeats, so slow drift on a shared machine hits every
method alike. Prints markdown tables. The benchmarks live by what they measure: decode_step (step,
fullstep, profile), memory (memory, prefill, camprompt), batch_rows (throughput, sweep, heads, rows),
cache_management (cache), generate (prompt), perturbation (perturb), all in experiments/bench/.
"""

from __future__ import annotations

import torch

from experiments.bench import batch_rows, cache_management, decode_step, generate, memory, perturbation
from experiments.common import add_model_args, load_model_from_args, new_parser, run_main

BENCHES = {"step": decode_step.bench_step, "memory": memory.bench_memory, "throughput": batch_rows.bench_throughput,
           "profile": decode_step.bench_profile, "fullstep": decode_step.bench_fullstep,
           "sweep": batch_rows.bench_sweep, "heads": batch_rows.bench_heads, "rows": batch_rows.bench_rows,
           "prompt": generate.bench_prompt, "prefill": memory.bench_prefill, "cache": cache_management.bench_cache,
           "perturb": perturbation.bench_perturb, "camprompt": memory.bench_camprompt}


def main(argv=None) -> None:
    parser = new_parser("bench.compress", __doc__)
    parser.add_argument("what", choices=tuple(BENCHES))
    add_model_args(parser)
    parser.add_argument("--budgets", default="128,256,1024",
                        help="budgets for 'step' and 'perturb' (default: 128,256,1024)")
    parser.add_argument("--lengths", default="1024,2048,4096,8192", help="context lengths (default: 1k..8k)")
    parser.add_argument("--batch", type=int, default=1,
                        help="batch rows; for 'throughput' the windows the batched evaluator takes as rows "
                             "(default: 1; use 32+ for throughput)")
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per repeat (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats, median kept (default: 3)")
    parser.add_argument("--window", type=int, default=512,
                        help="window for 'throughput', tokens for 'perturb' (default: 512)")
    parser.add_argument("--budget", type=int, default=128,
                        help="budget for 'throughput', 'heads' (mean per head) and 'rows' (default: 128)")
    parser.add_argument("--ks", default="2,4", help="jobs packed as rows, for 'rows' (default: 2,4)")
    parser.add_argument("--parts", default="forward,sweep,perplexity",
                        help="what 'perturb' runs (default: forward,sweep,perplexity)")
    parser.add_argument("--methods", default=None, help="methods for 'step', 'cache' and 'camprompt' (default: theirs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model_from_args(args)
    print(f"model {loaded.model_id}, device {loaded.device}, torch threads {torch.get_num_threads()}")
    BENCHES[args.what](loaded, args)


if __name__ == "__main__":
    run_main(main)
