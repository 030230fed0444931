"""Which heads can be compressed: profiles, per-head budget plans, evaluation on unseen text."""
