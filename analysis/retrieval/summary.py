"""From trial records to cells: accuracy with a Wilson interval, answer log-probability, fates.

A cell is (task, mode, method, budget, length, depth); ``cells`` gives one row each, as
``retrieval.json`` and ``retrieval.csv`` hold them. ``by_fate`` pools a method's trials by where
the fact went (the dominant fate of its tokens) and by how much of its keys survived: the paper's
claim, that a merged fact is retrieved more often than an evicted one, read off as counts. ``paired``
sets each merge beside its own eviction on the same trials (sign test on the answer's log-probability).
"""

from __future__ import annotations

import csv
import io
import statistics

from analysis.stats import sign_test, wilson

FATES = ("kept", "merged", "gone")
KEY_BINS = ((0.0, 0.0, "none"), (0.0, 0.25, "(0, 25%]"), (0.25, 0.5, "(25, 50%]"), (0.5, 1.0, "(50, 100%]"))


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _rate(records: list[dict]) -> dict:
    k, n = sum(r["correct"] for r in records), len(records)
    low, high = wilson(k, n)
    logp = [r["answer_logprob"] for r in records]
    return {"trials": n, "correct": k, "accuracy": round(k / n, 5) if n else None, "ci_low": round(low, 5),
            "ci_high": round(high, 5), "answer_logprob": round(statistics.fmean(logp), 5) if n else None,
            "answer_logprob_std": round(_spread(logp), 5)}


def cells(records: list[dict], task: str, mode: str) -> list[dict]:
    """One row per (method, budget, length, depth), in the records' order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"], r["length"], r["depth"]), []).append(r)
    rows = []
    for (method, budget, length, depth), group in groups.items():
        rate = _rate(group)
        rows.append({
            "task": task, "mode": mode, "method": method, "budget": budget, "length": length, "depth": depth,
            **rate,
            "fates": {f: round(statistics.fmean(r[f"fate_{f}"] for r in group), 5) for f in FATES},
            "keys": {"kept": round(statistics.fmean(r["fate_kept"] for r in group), 5),
                     "gone": round(1 - statistics.fmean(r["fate_kept"] for r in group), 5)},
            "merged_weight": round(statistics.fmean(r["merged_weight"] for r in group), 5),
        })
    return rows


def dominant_fate(record: dict) -> str:
    """The fate most of the fact's (token, layer, KV head) triples share (ties: kept, merged, gone)."""
    return max(FATES, key=lambda f: (record[f"fate_{f}"], -FATES.index(f)))


def by_fate(records: list[dict]) -> list[dict]:
    """Per (method, budget): success and answer log-probability by dominant fate and by surviving keys."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    rows = []
    for (method, budget), group in groups.items():
        for fate in FATES:
            part = [r for r in group if dominant_fate(r) == fate]
            if part:
                rows.append({"method": method, "budget": budget, "by": "fate", "group": fate, **_rate(part)})
        for low, high, name in KEY_BINS:
            part = [r for r in group if (r["fate_kept"] == 0 if high == 0 else low < r["fate_kept"] <= high)]
            if part:
                rows.append({"method": method, "budget": budget, "by": "keys kept", "group": name, **_rate(part)})
    return rows


def paired(records: list[dict], pairs: dict[str, str]) -> list[dict]:
    """Merge against its own eviction, trial by trial (same prompt, same budget): per (merge, budget), how
    often the merge gives the answer the higher log-probability (sign test), the mean difference with its
    spread, and the exact-match table (both right, merge only, eviction only, neither).

    ``pairs``: merging method -> its eviction ablation (``analysis.compress.eviction_ablation``)."""
    def key(r):
        return r["budget"], r["length"], r["depth"], r["trial"]

    index = {(r["method"], *key(r)): r for r in records}
    rows = []
    for merge, evict in pairs.items():
        for budget in dict.fromkeys(r["budget"] for r in records if r["method"] == merge):
            both = [(r, index[(evict, *key(r))]) for r in records
                    if r["method"] == merge and r["budget"] == budget and (evict, *key(r)) in index]
            if not both:
                continue
            diffs = [m["answer_logprob"] - e["answer_logprob"] for m, e in both]
            higher, lower = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
            rows.append({"method": merge, "evict": evict, "budget": budget, "pairs": len(both),
                         "merge_higher": higher, "merge_lower": lower, "p_value": round(sign_test(higher, lower), 6),
                         "mean_diff": round(statistics.fmean(diffs), 5), "std_diff": round(_spread(diffs), 5),
                         "both_right": sum(m["correct"] and e["correct"] for m, e in both),
                         "merge_only": sum(m["correct"] and not e["correct"] for m, e in both),
                         "evict_only": sum(e["correct"] and not m["correct"] for m, e in both),
                         "neither": sum(not m["correct"] and not e["correct"] for m, e in both)})
    return rows


PAIRED_COLUMNS = ("method", "evict", "budget", "pairs", "merge_higher", "merge_lower", "p_value", "mean_diff",
                  "std_diff", "both_right", "merge_only", "evict_only", "neither")
CELL_COLUMNS = ("task", "mode", "method", "budget", "length", "depth", "trials", "correct", "accuracy", "ci_low",
                "ci_high", "answer_logprob", "answer_logprob_std", "fate_kept", "fate_merged", "fate_gone",
                "keys_kept", "merged_weight")
TRIAL_COLUMNS = ("task", "mode", "method", "budget", "length", "depth", "trial", "answer", "said", "correct",
                 "answer_logprob", "answer_tokens", "needle_start", "needle_stop", "source", "fate_kept",
                 "fate_merged", "fate_gone", "merged_weight")


def flat_cell(row: dict) -> dict:
    return {**{k: v for k, v in row.items() if k not in ("fates", "keys")},
            **{f"fate_{f}": row["fates"][f] for f in FATES}, "keys_kept": row["keys"]["kept"]}


def to_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return buffer.getvalue()
