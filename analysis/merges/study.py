"""The merge study: the space on selection corpora, the chosen variants confirmed on unseen ones, KL, cascade.

Perplexity comes from the Table-I sweep (``analysis.perplexity.table1.run_table``: windows, batches of
rows each under its own policy, resumable), KL from the perturbation study's end-to-end decode
(``analysis.perturbation.end_to_end``), and the cascade from one stream per document decoded by the
evaluator's loop (``analysis.runtime.decode.decode_rows``) with the cache's mixing record on. No
decode loop of its own.

Cascade statistics, from the mixing record at the end of a stream (every layer, KV head and held slot):
a slot's *depth* is how many original tokens other than its own its value mixes; its *distance* is the
mixing-weighted mean of |position of the slot - position of each token it mixes|, over the merged
tokens only. The *gap* is the running mean of the per-token NLL difference variant - ablation.
"""

from __future__ import annotations

import statistics
from collections import Counter

import torch

from analysis.compress import PolicyOptions, RowPolicies
from analysis.jobs.job import make_jobs
from analysis.merges.space import ablation, paired_row
from analysis.models.loading import LoadedModel
from analysis.ops import running_mean
from analysis.perplexity.table1 import run_table
from analysis.perturbation.end_to_end import end_to_end
from analysis.runtime.batching import Batching
from analysis.runtime.decode import decode_rows
from analysis.text.corpora import load_documents, token_sequences

CHECKPOINTS = (128, 256, 512, 1024, 2048, 4096, 8192)


def paired_rows(table: dict, variants: list[str], split: str) -> list[dict]:
    """merges.json rows of one ``run_table`` result: each (variant, budget, corpus) against its ablation."""
    find = {(e["corpus"], e["method"], e["budget"]): e for e in table["entries"]}
    rows = []
    for variant in variants:
        for budget in table["budgets"]:
            for corpus in table["corpora"]:
                mine, evict = find.get((corpus, variant, budget)), find.get((corpus, ablation(variant), budget))
                if mine is None or evict is None:
                    continue
                rows.append(paired_row(variant, budget, corpus, mine["per_document_ppl"], evict["per_document_ppl"],
                                       mine["ppl"], evict["ppl"]) | {"split": split})
    return rows


def run_space(loaded: LoadedModel, corpora: list[str], variants: list[str], budgets: list[int], *, tokens: int,
              documents: int, window: int, options: PolicyOptions, batching: Batching | None = None,
              split: str) -> tuple[dict, list]:
    """Every variant and its ablation at every budget on ``corpora``: (the table, merges.json rows)."""
    methods = list(dict.fromkeys([*variants, *(ablation(v) for v in variants)]))
    jobs = make_jobs(methods, budgets, options, window=window)
    table = run_table(loaded, corpora, jobs, tokens=tokens, documents=documents, window=window, batching=batching)
    return table, paired_rows(table, variants, split)


def run_kl(loaded: LoadedModel, corpora: list[str], variants: list[str], budget: int, *, tokens: int, documents: int,
           options: PolicyOptions, progress=None) -> dict[str, dict]:
    """Mean end-to-end KL(full || compressed) per variant and ablation at ``budget``, from the positions after the
    cache first fills, over ``documents`` documents of each corpus: {method: {"kl", "kl_std"}} (std over documents)."""
    methods = list(dict.fromkeys([*variants, *(ablation(v) for v in variants)]))
    jobs = make_jobs(methods, [budget], options, window=tokens)
    per_doc: dict[str, list[float]] = {job.method: [] for job in jobs}
    for corpus in corpora:
        for _, ids in token_sequences(loaded.tokenizer, load_documents(corpus=corpus), tokens, documents):
            kl = end_to_end(loaded.model, torch.tensor(ids, device=loaded.device), jobs)["kl"]  # (J, T-1)
            for j, job in enumerate(jobs):
                per_doc[job.method].append(float(kl[j, budget:].mean()))
            if progress is not None:
                progress(1)
    return {m: {"kl": round(statistics.fmean(v), 6), "kl_std": round(statistics.pstdev(v), 6)}
            for m, v in per_doc.items()}


def mixing_stats(mixing: torch.Tensor, positions: torch.Tensor) -> tuple[Counter, list[float]]:
    """Depths (a Counter) and distances (one per merged slot) of one layer: mixing (B, H, C, T), positions (B, H, C)."""
    held = positions >= 0  # (B, H, C)
    mixes = mixing > 0  # (B, H, C, T)
    depth = (mixes.sum(-1) - 1).clamp_min(0)[held]  # (slots,)
    token = torch.arange(mixing.shape[-1], device=mixing.device)  # (T,)
    others = mixes & (token != positions[..., None])  # merged tokens only
    weight = torch.where(others, mixing, 0.0)
    far = (positions[..., None] - token).abs().float()  # (B, H, C, T)
    mass = weight.sum(-1)
    merged = held & (mass > 0)
    distance = (weight * far).sum(-1)[merged] / mass[merged]
    return Counter(depth.tolist()), distance.tolist()


def run_cascade(loaded: LoadedModel, corpus: str, variants: list[str], budget: int, *, tokens: int, documents: int,
                options: PolicyOptions, progress=None) -> dict:
    """Per variant: the depth distribution and distances at the end of each stream, and the running NLL gap to
    its ablation at ``CHECKPOINTS`` (mean over documents, with its population std)."""
    methods = list(dict.fromkeys([*variants, *(ablation(v) for v in variants)]))
    jobs = make_jobs(methods, [budget], options, window=tokens)
    policies = RowPolicies(policies=[j.policy for j in jobs], rows=list(range(len(jobs))))
    depths = {m: Counter() for m in methods}
    distances: dict[str, list[float]] = {m: [] for m in methods}
    curves: dict[str, list[torch.Tensor]] = {m: [] for m in methods}

    def inspect(cache):
        for state in (layer.state for layer in cache.layers if getattr(layer, "state", None) is not None):
            for j, job in enumerate(jobs):
                count, dist = mixing_stats(state.mixing[j:j + 1], state.positions[j:j + 1])
                depths[job.method] += count
                distances[job.method] += dist

    for _, ids in token_sequences(loaded.tokenizer, load_documents(corpus=corpus), tokens, documents):
        rows = torch.tensor(ids).repeat(len(jobs), 1)  # (J, T): every job on the same stream
        nll = decode_rows(loaded.model, rows, policies, budget, window_ids=[0] * len(jobs),
                          row_budgets=[budget] * len(jobs), track_mixing=tokens, inspect=inspect)  # (J, T-1)
        for j, job in enumerate(jobs):
            curves[job.method].append(nll[j])
        if progress is not None:
            progress(1)
    out = {}
    for v in variants:
        gap = running_mean(torch.stack(curves[v]) - torch.stack(curves[ablation(v)]))  # (documents, T-1)
        points = [c for c in CHECKPOINTS if c <= gap.shape[1]]
        out[v] = {"evict": ablation(v), "depth_histogram": {int(k): n for k, n in sorted(depths[v].items())},
                  "mean_depth": _mean_of(depths[v]), "merged_share": _share(depths[v]),
                  "max_depth": max(depths[v]) if depths[v] else 0,
                  "distance_mean": round(statistics.fmean(distances[v]), 2) if distances[v] else None,
                  "distance_median": round(statistics.median(distances[v]), 2) if distances[v] else None,
                  "gap_at": {str(c): round(float(gap[:, c - 1].mean()), 5) for c in points},
                  "gap_std_at": {str(c): round(float(gap[:, c - 1].std(unbiased=False)), 5) for c in points},
                  "gap_curve": [round(float(x), 5) for x in gap.mean(0)[::max(1, gap.shape[1] // 200)]]}
    return {"corpus": corpus, "budget": budget, "tokens": tokens, "documents": documents, "variants": out}


def _mean_of(counts: Counter) -> float:
    n = sum(counts.values())
    return round(sum(k * c for k, c in counts.items()) / n, 4) if n else 0.0


def _share(counts: Counter) -> float:
    n = sum(counts.values())
    return round(sum(c for k, c in counts.items() if k > 0) / n, 4) if n else 0.0
