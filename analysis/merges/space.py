"""The variants of the merge study, their eviction ablations, and the paired statistics.

A variant is any method name (a preset, a ``merge:`` point, or a registered merging method). Its
ablation is the same selection with ``target=none``: ``weightedkv_evict`` for average-attention
selection, ``streaming_llm`` for CaM's selection by position. Pairs are per (corpus, document, budget)
cell: a variant *wins* a cell when its perplexity is below its ablation's.
"""

from __future__ import annotations

import statistics

from analysis.compress import eviction_ablation
from analysis.errors import UserError
from analysis.stats import sign_test

# The factorial over target x weights x what merges (selection by average attention, no guard), then the
# presets, CaM, and WeightedKV with a depth cap (the cascade's test). ``weightedkv`` is
# merge:target=right,weights=attention,what=value and ``mergingpress_like`` is target=similar,weights=norm_ratio:
# they stand for those points of the factorial.
FACTORIAL = [
    "weightedkv", "merge:weights=equal", "merge:weights=similarity", "merge:weights=norm_ratio",
    "weightedkv_similar", "merge:target=similar,weights=equal", "merge:target=similar,weights=similarity",
    "mergingpress_like",
    "merge:what=key_value", "merge:weights=equal,what=key_value", "merge:weights=similarity,what=key_value",
    "merge:weights=norm_ratio,what=key_value",
    "merge:target=similar,what=key_value", "merge:target=similar,weights=equal,what=key_value",
    "merge:target=similar,weights=similarity,what=key_value", "merge:target=similar,weights=norm_ratio,what=key_value",
]
PRESET_VARIANTS = ["keepkv_like", "d2o_like", "asymkv_like", "cam", "merge:cap=1", "merge:cap=2"]
VARIANTS = FACTORIAL + PRESET_VARIANTS
CASCADE_VARIANTS = ["weightedkv", "merge:cap=1", "merge:cap=2", "weightedkv_similar"]


def ablation(variant: str) -> str:
    """The eviction ablation a variant is paired with: its own selection, nothing merged."""
    evict = eviction_ablation(variant)
    if evict is None:
        raise UserError(f"{variant!r} does not merge: the merge study pairs merging variants with their eviction")
    return evict


def check_variants(variants: list[str]) -> list[str]:
    """Every variant a merging method, each once; their ablations checked too (one-line errors)."""
    if not variants:
        raise UserError("--variants: choose at least one merging variant")
    for v in variants:
        ablation(v)
    return list(dict.fromkeys(variants))


def paired_row(variant: str, budget: int, corpus: str, mine: dict, evict: dict, ppl: float, evict_ppl: float) -> dict:
    """One merges.json row: per-document perplexities ``mine`` and ``evict`` ({doc: ppl}) of one (budget, corpus)."""
    docs = [d for d in mine if d in evict]
    diffs = [mine[d] - evict[d] for d in docs]  # < 0: the merge is better
    wins, losses = sum(x < 0 for x in diffs), sum(x > 0 for x in diffs)
    return {"variant": variant, "budget": budget, "corpus": corpus, "ppl": round(ppl, 4),
            "evict_ppl": round(evict_ppl, 4), "wins": wins, "cells": len(docs),
            "p_value": round(sign_test(wins, losses), 6),
            "mean_diff": round(statistics.fmean(diffs), 4) if diffs else None,
            "std_diff": round(statistics.pstdev(diffs), 4) if diffs else None,
            "evict": ablation(variant)}


def pooled(rows: list[dict], variant: str, corpora: list[str]) -> dict:
    """A variant's cells over ``corpora`` and every budget: wins, cells, sign-test p, mean paired difference."""
    mine = [r for r in rows if r["variant"] == variant and r["corpus"] in corpora]
    wins, cells = sum(r["wins"] for r in mine), sum(r["cells"] for r in mine)
    mean = sum(r["mean_diff"] * r["cells"] for r in mine if r["cells"]) / cells if cells else None
    return {"variant": variant, "corpora": corpora, "wins": wins, "cells": cells,
            "win_rate": round(wins / cells, 4) if cells else None, "p_value": round(sign_test(wins, cells - wins), 6),
            "mean_diff": round(mean, 4) if mean is not None else None}


def choose(rows: list[dict], variants: list[str], corpora: list[str], top: int = 1) -> list[dict]:
    """The ``top`` variants by win rate over ``corpora`` (ties: the lower mean paired difference)."""
    scored = [pooled(rows, v, corpora) for v in variants]
    scored = [s for s in scored if s["cells"]]
    return sorted(scored, key=lambda s: (-s["win_rate"], s["mean_diff"]))[:top]
