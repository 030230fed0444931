"""Does a head plan beat a uniform budget on text it never saw? Perplexity of plans at equal memory.

Each plan is run by the perplexity evaluator (``analysis.perplexity.sweep.run_sweep`` with ``plan=``, method
weightedkv: the plan's per-head ``merge`` flags choose merge or evict) on evaluation documents that
must not share a document with the profiling text (``check_split``).
"""

from __future__ import annotations

from analysis.compress import PolicyOptions
from analysis.errors import UserError
from analysis.heads.allocate import BASELINES
from analysis.jobs.job import Job
from analysis.models.loading import LoadedModel
from analysis.options import parse_names
from analysis.perplexity.sweep import run_sweep
from analysis.runtime.batching import Batching
from analysis.text.corpora import load_documents, token_sequences

METHOD = "weightedkv"


def evaluation_options(plan, baselines: str | list[str], tokens: int, window: int) -> list[str]:
    """The baselines named (a comma list or a page's chosen list), once the plan fits the window: the checks
    ``experiments.heads evaluate`` and the Heads page share, before any model work."""
    names = parse_names(baselines)
    for n in names:
        if n not in BASELINES:
            raise UserError(f"unknown baseline {n!r}: choose from {', '.join(BASELINES)}")
    if tokens < window:
        raise UserError(f"--tokens {tokens} is shorter than --window {window}")
    if plan.max_budget >= window:
        raise UserError(f"plan {plan.name!r} gives a head {plan.max_budget} slots, not below --window {window}")
    return names


def base_id(text_id: str) -> str:
    """A sequence id without its chunk suffix: 'books/x#2' is a chunk of document 'books/x'."""
    return text_id.split("#", 1)[0]


def check_split(profile_ids, evaluation_ids) -> None:
    """One-line error when an evaluation sequence comes from a profiled document."""
    profiled = {base_id(t) for t in profile_ids}
    shared = sorted({base_id(t) for t in evaluation_ids} & profiled)
    if shared:
        raise UserError(f"evaluation text overlaps the profiling text ({len(shared)} document(s), e.g. {shared[0]}): "
                        "pick other documents (--skip N) or another corpus")


def profiled_ids(plan_data: dict, where: str, allow_missing: bool = False) -> tuple[list[str], bool]:
    """The profiled text ids a plan file records, and whether the overlap check can run.

    A plan without a ``profile`` block (or one with no ``text_ids`` list) cannot be checked against
    its evaluation text: refused unless ``allow_missing`` (``--no-profile-check``), then (``[]``, False).
    """
    block = plan_data.get("profile")
    ids = block.get("text_ids") if isinstance(block, dict) else None
    if isinstance(ids, list) and all(isinstance(t, str) for t in ids):
        return ids, True
    if not allow_missing:
        raise UserError(f"plan file {where} has no 'profile' block with the profiled text_ids, so the evaluation "
                        "text cannot be checked against it: use a plan from `experiments.heads plan`, or pass "
                        "--no-profile-check")
    return [], False


def evaluation_sequences(tokenizer, source: dict, tokens: int, documents: int, skip: int = 0,
                         profile_ids=()) -> list[tuple[str, list[int]]]:
    """``documents`` sequences of ``tokens`` from ``source`` after skipping its first ``skip`` documents."""

    if skip < 0:
        raise UserError(f"--skip must be at least 0, got {skip}")
    docs = load_documents(**source)
    if skip >= len(docs):
        raise UserError(f"--skip {skip} leaves none of the {len(docs)} documents of {source}")
    sequences = token_sequences(tokenizer, docs[skip:], tokens, documents)
    check_split(profile_ids, [t for t, _ in sequences])
    return sequences


def evaluate_plans(loaded: LoadedModel, windows, plans: list, source: dict, tokens: int, documents: int,
                   batch_size: int = 32, progress=None, seed: int = 0) -> list[dict]:
    """One evaluation.json row per plan: plan name, total slots, corpus, ppl and per-document ppl.

    The plans run side by side, a (plan, window) per batch row (``analysis.perplexity.runner``): one
    decode serves them all, each row under its own per-head budgets and merge flags. Each plan is checked
    against the model once (``Plan.check``, by the cache that first holds it; the command checks the
    user's plan before any work).
    """
    names = [plan.name for plan in plans]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"plans to compare need distinct names: {', '.join(map(repr, twice))} given twice "
                        "(name the plan otherwise, e.g. `experiments.heads plan --name`)")
    jobs = [Job.of(METHOD, options=PolicyOptions(seed=seed), plan=plan) for plan in plans]
    summary, _ = run_sweep(loaded, windows, jobs, source=source, tokens=tokens, documents=documents,
                           batching=Batching(batch_size=batch_size, progress=progress))
    rows = []
    for plan, r in zip(plans, summary["results"]):
        rows.append({"plan": plan.name, "total_slots": plan.total_slots, "corpus": source.get("corpus", "text"),
                     "source": source, "ppl": r["ppl"], "per_document_ppl": r["per_document_ppl"],
                     "tokens": r["tokens"], "seconds": r["seconds"], "mean_budget": r["budget"]})
    return rows


def comparison(results: list[dict], reference: str = "uniform") -> list[dict]:
    """Per corpus and plan: ppl change against ``reference`` in %, overall and per document (min/max)."""
    out = []
    for r in results:
        ref = next((x for x in results if x["plan"] == reference and x["corpus"] == r["corpus"]), None)
        if ref is None or r is ref:
            continue
        per = [100 * (r["per_document_ppl"][d] / ref["per_document_ppl"][d] - 1) for d in r["per_document_ppl"]
               if d in ref["per_document_ppl"]]
        out.append({"corpus": r["corpus"], "plan": r["plan"], "versus": reference,
                    "ppl_change_percent": 100 * (r["ppl"] / ref["ppl"] - 1),
                    "per_document_change_percent": per, "best_document": min(per), "worst_document": max(per)})
    return out
