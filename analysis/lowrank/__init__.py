"""Low-rank keys against token compression at equal cache bytes (issue 18): calibration, comparison, per-head cost.

The basis object and the cache's codec live below (``analysis.jobs.basis``, ``analysis.runtime.channels``)
so the cache can use them; this study package calibrates bases, sizes configurations to equal bytes,
runs them through the perplexity evaluator and measures what each rank costs per head.
"""
