"""The benchmarks; their results go to docs/benchmarks.md (ratios taken within one run).

    python -m experiments.bench.compress WHAT   the compression core, by what it measures:
        decode_step (step, fullstep, profile), memory (memory, prefill, camprompt),
        batch_rows (throughput, sweep, heads, rows), cache_management (cache), generate (prompt),
        perturbation (perturb); measure holds what they share
    python -m experiments.bench.lowrank         a decode step and the cache's bytes with rank-r keys
    python -m experiments.bench.retrieval       the retrieval grid as batch rows against trial by trial
    python -m experiments.bench.spectra         batched compute_spectra against a per-head loop

The old names (``python -m experiments.bench_compress ...`` and the three others) still run these.
"""
