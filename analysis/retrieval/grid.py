"""A retrieval grid: settings checked before any work, its prompts, its run, and the result it writes.

    settings = retrieval_settings("passkey", lengths="1024,2048", budget="64,128")
    prompts = build_prompts(loaded.tokenizer, settings)
    result = run_grid(loaded, settings, prompts)      # rows (one per cell), by_fate, paired, trials, examples

The command (``experiments.retrieval``), the Retrieval page and the figure registry all go through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from analysis.compress import PolicyOptions, eviction_ablation, method_names
from analysis.errors import UserError
from analysis.jobs.basis import LowRank
from analysis.jobs.job import Job, make_jobs
from analysis.models.loading import LoadedModel
from analysis.options import parse_ints, parse_names
from analysis.retrieval.run import Unit, run_units
from analysis.retrieval.summary import by_fate, cells, paired
from analysis.retrieval.tasks import (
    TASKS,
    Prompt,
    check_depths,
    haystacks,
    needle_prompt,
    passkey_prompt,
    protected_from,
)
from analysis.runtime.batching import Batching

MODES = ("decode", "prefill")
DEFAULT_METHODS = ",".join(method_names())  # every registered method, the full reference first
GREEDY = 8  # tokens decoded greedily per trial, to show what each method answered


@dataclass(frozen=True)
class RetrievalSettings:
    task: str
    mode: str
    lengths: list[int]
    depths: list[int]
    budgets: list[int]
    methods: list[str]
    trials: int
    seed: int = 0
    sinks: int = 4
    recent: int | None = None
    protect_question: bool = False
    lowrank: LowRank | None = None  # keys (and values) held in low rank in every job, the reference too
    jobs: list[Job] = field(default_factory=list, compare=False)

    def record(self) -> dict:
        """What a result (and a resumed run) must agree on."""
        return {"task": self.task, "mode": self.mode, "lengths": self.lengths, "depths": self.depths,
                "budgets": self.budgets, "methods": self.methods, "trials": self.trials, "seed": self.seed,
                "sinks": self.sinks, "recent": self.recent, "protect_question": self.protect_question,
                "lowrank": None if self.lowrank is None else self.lowrank.tag}


def _ints(value, name: str) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else parse_ints(str(value), name)


def retrieval_settings(task: str, mode: str = "decode", lengths="1024,2048", depths="0,25,50,75,100",
                       budget="64,128", methods=None, trials: int = 10, seed: int = 0, sinks: int = 4,
                       recent: int | None = None, protect_question: bool = False,
                       lowrank: LowRank | None = None) -> RetrievalSettings:
    """Every check that needs no model: a bad value fails here, before anything loads or is written."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; valid: {', '.join(TASKS)}")
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")
    lengths, depths, budgets = _ints(lengths, "lengths"), check_depths(_ints(depths, "depths")), _ints(budget, "budget")
    if not lengths or min(lengths) < 64:
        raise UserError(f"--lengths must be at least 64 tokens each, got {lengths}")
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    names = parse_names(DEFAULT_METHODS if methods in (None, "") else methods)
    if not names:
        raise UserError("--methods: choose at least one method")
    jobs = make_jobs(names, budgets, PolicyOptions(sinks, recent, seed), window=min(lengths))
    if lowrank is not None:
        jobs = [replace(job, lowrank=lowrank) for job in jobs]
    if any(job.compresses for job in jobs) and not budgets:
        raise UserError("--budget: give at least one budget for the compressing methods")
    return RetrievalSettings(task, mode, lengths, depths, budgets, names, trials, seed, sinks, recent,
                             protect_question, lowrank, jobs)


def check_positions(settings: RetrievalSettings, max_positions: int | None, answer: int = 16) -> None:
    """A prompt, its answer and the greedy tokens must fit the model's positions (RoPE range)."""
    need = max(settings.lengths) + max(answer, GREEDY)
    if max_positions and need > max_positions:
        raise UserError(f"--lengths {max(settings.lengths)}: the context and its answer ({need} tokens) exceed "
                        f"the model's {max_positions} positions")


def build_prompts(tokenizer, settings: RetrievalSettings, docs=None) -> list[Prompt]:
    """Every (length, trial, depth) prompt; ``docs`` (needle task) are the haystack documents."""
    prompts = []
    for length in settings.lengths:
        if settings.task == "needle":
            if not docs:
                raise UserError("the needle task needs haystack text (a corpus or --text FILE)")
            hay = haystacks(tokenizer, docs, length, settings.trials)
        for trial in range(settings.trials):
            for depth in settings.depths:
                if settings.task == "passkey":
                    prompts.append(passkey_prompt(tokenizer, length, depth, trial, settings.seed))
                else:
                    prompts.append(needle_prompt(tokenizer, hay[trial], length, depth, trial, settings.seed))
    return prompts


def grid_units(settings: RetrievalSettings, prompts: list[Prompt]) -> list[Unit]:
    return [Unit(job, p) for job in settings.jobs for p in prompts]


def example(tokenizer, prompt: Prompt) -> dict:
    """A prompt as text in four parts (before the needle, the needle, after it, the question), for display."""
    ids, (start, stop) = list(prompt.ids), prompt.needle
    text = lambda part: tokenizer.decode(part)  # noqa: E731
    return {"length": prompt.length, "depth": prompt.depth, "trial": prompt.trial, "answer": prompt.answer_text,
            "before": text(ids[:start]), "needle": text(ids[start:stop]), "after": text(ids[stop : prompt.question]),
            "question": text(ids[prompt.question :])}


def run_grid(loaded: LoadedModel, settings: RetrievalSettings, prompts: list[Prompt], batching: Batching | None = None,
             greedy: int = GREEDY) -> dict:
    """Run every unit and summarise: {settings, model, rows, by_fate, paired (merge vs its eviction, trial by
    trial), trials, examples}."""
    tok = loaded.tokenizer
    check_positions(settings, loaded.summary()["max_positions"], max(len(p.answer) for p in prompts))
    protect = (lambda length: protected_from(tok, settings.task, length)) if settings.protect_question else None
    records = run_units(loaded.model, grid_units(settings, prompts), settings.mode, protect, batching, greedy)
    trials = []
    for r in records:
        said = tok.decode(r["greedy"], skip_special_tokens=True).strip() if r.get("greedy") is not None else None
        trials.append({"task": settings.task, "mode": settings.mode, **{k: v for k, v in r.items() if k != "greedy"},
                       "said": said})
    firsts = [p for p in prompts if p.trial == 0]
    pairs = {m: eviction_ablation(m) for m in settings.methods if eviction_ablation(m) in settings.methods}
    return {"settings": settings.record(), "model": loaded.model_id, "device": str(loaded.device),
            "rows": cells(trials, settings.task, settings.mode), "by_fate": by_fate(trials),
            "paired": paired(trials, pairs), "trials": trials, "examples": [example(tok, p) for p in firsts]}
