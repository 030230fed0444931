"""A Table-I-style table: perplexity of every method at each budget on several corpora, per-document spread.

All corpora's windows go into ONE perplexity sweep (``analysis.perplexity.sweep.run_sweep``), so a budget's
(method, window) rows of every corpus share batches; the sweep's NLL rows are then split back per
corpus and summarised with the sweep's own protocol (``analysis.perplexity.windows.summarise``). Spread: the
population standard deviation of the per-document perplexities (0 with one document).
"""

from __future__ import annotations

import csv
import io
import math
import statistics

import torch

from analysis.compress import compresses
from analysis.jobs.job import Job
from analysis.models.loading import LoadedModel
from analysis.perplexity.sweep import jobs_settings, run_sweep
from analysis.perplexity.windows import Windows, make_windows, summarise
from analysis.runtime.batching import Batching
from analysis.text.corpora import bos_id, load_documents, token_sequences

SEP = "/"  # corpus / document id in the combined sweep


def corpus_windows(tokenizer, corpora: list[str], tokens: int, documents: int, window: int) -> Windows:
    """Every corpus's documents cut into windows, concatenated; document ids become ``corpus/doc``."""

    parts = []
    for corpus in corpora:
        sequences = token_sequences(tokenizer, load_documents(corpus=corpus), tokens, documents)
        parts.append(make_windows([(f"{corpus}{SEP}{doc}", ids) for doc, ids in sequences], window,
                                  bos_id(tokenizer)))
    return Windows(torch.cat([p.ids for p in parts]), sum((p.docs for p in parts), []),
                   sum((p.starts for p in parts), []), sum((p.scored_from for p in parts), []))


def window_count(tokens: int, window: int) -> int:
    """Windows one document of ``tokens`` tokens is cut into (for progress totals)."""
    return len(make_windows([("x", list(range(tokens)))], window).docs)


def split_by_corpus(windows: Windows, summary: dict, tensors: dict) -> list[dict]:
    """One entry per (corpus, method, budget) from a combined sweep's summary and NLL tensors."""
    entries = []
    corpora = list(dict.fromkeys(doc.split(SEP, 1)[0] for doc in windows.docs))
    for corpus in corpora:
        rows = [i for i, doc in enumerate(windows.docs) if doc.split(SEP, 1)[0] == corpus]
        sub = Windows(windows.ids[rows], [windows.docs[i] for i in rows], [windows.starts[i] for i in rows],
                      [windows.scored_from[i] for i in rows])
        for r in summary["results"]:
            nll = tensors[f"{r['method']}@{r['budget']}"][rows]
            one = summarise(sub, nll, r["method"], r["budget"], r["seconds"] * len(rows) / len(windows.docs))
            docs = list(one["per_document_ppl"].values())
            entries.append({
                "corpus": corpus, "method": r["method"], "budget": r["budget"] if compresses(r["method"]) else None,
                "ppl": round(one["ppl"], 4),
                "ppl_doc_mean": round(statistics.fmean(docs), 4),
                "ppl_doc_std": round(statistics.pstdev(docs), 4),
                "documents": len(docs), "tokens": one["tokens"],
                "per_document_ppl": {doc.split(SEP, 1)[1]: v for doc, v in one["per_document_ppl"].items()},
            })
    return entries


def run_table(loaded: LoadedModel, corpora: list[str], jobs: list[Job], *, tokens: int, documents: int, window: int,
              batching: Batching | None = None) -> dict:
    """Run the combined sweep and return {settings..., "entries": [...]} (see ``split_by_corpus``).

    Table I's rows are every registered method (``analysis.compress.method_names()``).
    """
    windows = corpus_windows(loaded.tokenizer, corpora, tokens, documents, window)
    summary, tensors = run_sweep(loaded, windows, jobs, source={"corpora": corpora}, tokens=tokens,
                                 documents=documents, batching=batching)
    settings = jobs_settings(jobs)
    return {"model": summary["model"], "corpora": corpora, "budgets": settings["budgets"], "tokens": tokens,
            "documents": documents, "window": window, "stride": window // 2, "sinks": settings["sinks"],
            "recent": settings["recent"], "seed": settings["seed"], "methods": settings["methods"],
            "spread": "population std of the per-document perplexities",
            "entries": split_by_corpus(windows, summary, tensors)}


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "-"
    if entry["documents"] > 1:
        return f"{entry['ppl']:.2f} ± {entry['ppl_doc_std']:.2f}"
    return f"{entry['ppl']:.2f}"


def paired(table: dict, method: str = "weightedkv", other: str = "weightedkv_evict") -> tuple[int, int]:
    """(cells where ``method`` has the lower perplexity, cells): one cell per (corpus, budget, document)."""
    find = {(e["corpus"], e["method"], e["budget"]): e["per_document_ppl"] for e in table["entries"]}
    lower = total = 0
    for corpus in table["corpora"]:
        for budget in table["budgets"]:
            a, b = find.get((corpus, method, budget)), find.get((corpus, other, budget))
            if a is None or b is None:
                continue
            lower += sum(a[d] < b[d] for d in a if d in b)
            total += sum(d in b for d in a)
    return lower, total


def table_markdown(table: dict) -> str:
    """Table I's layout: a row per method, a column per (corpus, m); full fills its corpus's columns."""
    find = {(e["corpus"], e["method"], e["budget"]): e for e in table["entries"]}
    columns = [(c, b) for c in table["corpora"] for b in table["budgets"]]
    lines = ["| method | " + " | ".join(f"{c} m={b}" for c, b in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in table["methods"]:
        cells = [_cell(find.get((c, method, b if compresses(method) else None))) for c, b in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    note = (f"Perplexity ({table['model']}), {table['documents']} document(s) x {table['tokens']} tokens per corpus, "
            f"window {table['window']}, stride {table['stride']}, {table['sinks']} sinks"
            + ("; ± = population std over documents" if table["documents"] > 1 else "") + ".")
    lower, total = paired(table)
    if total:  # the comparison the spread between documents hides
        note += (f"\n\nPaired by document: weightedkv's perplexity is below weightedkv_evict's in {lower} of {total} "
                 f"(corpus, budget, document) cells.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def table_csv(table: dict) -> str:
    header = ["corpus", "method", "budget", "ppl", "ppl_doc_mean", "ppl_doc_std", "documents", "tokens"]
    buffer = io.StringIO()  # csv quotes a merge point's commas (merge:target=similar,cap=2)
    csv.writer(buffer, lineterminator="\n").writerows(
        [header] + [["" if e[h] is None else e[h] for h in header] for e in table["entries"]])
    return buffer.getvalue()


def check_finite(table: dict) -> None:
    bad = [f"{e['corpus']} {e['method']}" for e in table["entries"] if not math.isfinite(e["ppl"])]
    if bad:
        raise ValueError(f"non-finite perplexity for {', '.join(bad)}")
