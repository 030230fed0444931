"""Benchmark: a decode step with rank-r keys against the same token method with full keys (docs/benchmarks.md).

    python -m experiments.bench.lowrank --basis BASIS --method weightedkv --budget 256 --rank 16 --batches 1,32

For each batch size: the cache is prefilled with --context tokens (random ids), then --steps single-token
steps are timed, alternating full keys and rank-r keys (median of --repeats, interleaved so drift on a
shared machine hits both alike). Also the cache's bytes: logical (what a ragged store holds, ranks
counted per head) and physical (the tensors' real sizes), with full and low-rank keys. Prints markdown.
"""

from __future__ import annotations

import statistics
import time

import torch

from analysis.jobs.basis import Basis, LowRank
from analysis.runtime.cache import CompressedCache
from experiments.common import add_model_args, load_model_from_args, new_parser, parse_ints, run_main


def _run(model, ids, method, budget, lowrank, context, steps) -> tuple[float, dict]:
    """Seconds per decode step after a ``context``-token prefill, and the cache's memory()."""
    batch = ids.shape[0]
    with torch.inference_mode(), CompressedCache(model, method, budget, lowrank=lowrank) as cache:
        for start in range(0, context, 256):
            stop = min(start + 256, context)
            model(ids[:, start:stop], past_key_values=cache, position_ids=torch.arange(start, stop).expand(batch, -1))
        began = time.perf_counter()
        for t in range(context, context + steps):
            model(ids[:, t:t + 1], past_key_values=cache, position_ids=torch.full((batch, 1), t))
        return (time.perf_counter() - began) / steps, cache.memory()


def main(argv=None) -> None:
    parser = new_parser("bench.lowrank", __doc__)
    add_model_args(parser)
    parser.add_argument("--basis", required=True, metavar="DIR")
    parser.add_argument("--method", default="weightedkv")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    lowrank = LowRank(Basis.load(args.basis), key_rank=args.rank)
    loaded = load_model_from_args(args)
    lowrank.basis.check(loaded.model)
    print(f"| batch | full keys ms/step | rank-{args.rank} keys ms/step | ratio | logical bytes full → low-rank "
          "| physical bytes full → low-rank |")
    print("|---|---|---|---|---|---|")
    for batch in parse_ints(args.batches, "batches"):
        ids = torch.randint(0, loaded.model.config.vocab_size, (batch, args.context + args.steps),
                            generator=torch.Generator().manual_seed(0))
        times = {"full": [], "low": []}
        for _ in range(args.repeats):
            for name, lr in (("full", None), ("low", lowrank)):
                seconds, memory = _run(loaded.model, ids, args.method, args.budget, lr, args.context, args.steps)
                times[name].append(seconds)
                times[name + "_memory"] = memory
        full, low = statistics.median(times["full"]), statistics.median(times["low"])
        mf, ml = times["full_memory"], times["low_memory"]
        print(f"| {batch} | {full * 1000:.1f} | {low * 1000:.1f} | {low / full:.2f} | "
              f"{mf['logical_bytes']:,} → {ml['logical_bytes']:,} | {mf['physical_bytes']:,} → "
              f"{ml['physical_bytes']:,} (+{ml['basis_bytes']:,} basis) |")


if __name__ == "__main__":
    run_main(main)
