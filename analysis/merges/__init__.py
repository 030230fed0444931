"""The merge-design-space study: every variant paired with its own eviction ablation (``experiments.merges``)."""
