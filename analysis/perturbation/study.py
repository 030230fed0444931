"""Run a perturbation study (fig2, sweep, end2end, ideal) over sequences and save it: used by the
command ``python -m experiments.perturbation`` and the dashboard page.

Sliding-window layers (Gemma 2/3) are left to the model's own sliding cache by ``CompressedCache``, so
fig2, sweep and ideal study only the layers it compresses (default: all of those); end2end decodes
the whole model through the cache and reports every layer's attention deviation.

Every study goes one sequence at a time (capture it, measure it, keep only the small results), then
summarises as mean ± std over sequences (``analysis.perturbation.summary.summary_rows``). Output directory:
``perturbation.json`` (settings + result rows), ``perturbation.csv`` (the rows, curves left out),
``curves.safetensors`` (full per-(layer, head) curves, mean over sequences) and the figures.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from analysis.compress import PolicyOptions, WeightedKV, compresses, policy_class
from analysis.errors import UserError
from analysis.jobs.job import Job, make_jobs
from analysis.models.loading import LoadedModel, compressed_layers
from analysis.options import parse_ints, parse_names
from analysis.perturbation.end_to_end import end_to_end
from analysis.perturbation.ideal import ideal_sequence
from analysis.perturbation.one_step import pair_jobs
from analysis.perturbation.summary import fig2_sequence, summary_rows, teacher_forced_sequence
from analysis.runtime.capture import capture_sequences

MODES = ("fig2", "sweep", "end2end", "ideal")


KINDS = ("query_post_rope", "key_post_rope", "value")


RESULTS = "perturbation.json"


CSV_FIELDS = ("mode", "metric", "method", "budget", "layer", "kv_head", "mean", "std", "sequences")


@dataclass
class Settings:
    mode: str
    tokens: int  # per sequence (fig2: t0 + future)
    layers: list[int] | None = None
    heads: list[int] | None = None  # KV heads reported (all are computed)
    methods: list[str] = field(default_factory=lambda: ["weightedkv", "weightedkv_evict"])
    budgets: list[int] = field(default_factory=list)
    t0: int = 100
    future: int = 800
    steps: list[int] = field(default_factory=lambda: [100])
    sinks: int = 4
    recent: int | None = None
    seed: int = 0

    def validate(self) -> None:

        if self.mode not in MODES:
            raise UserError(f"unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        for m in self.methods:
            policy_class(m)  # unknown names, presets and bad merge points: one line
        if self.mode in ("sweep", "end2end"):
            if not self.budgets:
                raise UserError("give at least one --budget")
            jobs_of(self)  # budget <= sinks + recent: one-line error
        if self.mode == "ideal" and (min(self.steps) < 2 or max(self.steps) + self.future > self.tokens):
            raise UserError(f"--steps must lie in 2..{self.tokens - self.future} (--tokens minus --future)")
        if self.mode in ("fig2", "ideal"):
            WeightedKV((self.t0 if self.mode == "fig2" else min(self.steps)) - 1, self.sinks, self.recent)

    @classmethod
    def from_options(cls, mode: str, *, tokens: int = 0, sequences: int = 1, layers: str | None = None,
                     heads: str | None = None, methods: str | list[str] | None = None, budget: str | None = None,
                     t0: int = 100, future: int = 0, steps: str | None = None, sinks: int = 4,
                     recent: int | None = None, seed: int = 0) -> Settings:
        """Settings from option values as the command spells them (``--layers 0,5-7``, ``--methods a,b``),
        validated; the Perturbation page builds its settings here too. Options a mode has not are ignored:
        ``t0`` is fig2's, ``future`` fig2's and ideal's, ``budget`` sweep's and end2end's, ``steps`` ideal's;
        ``tokens`` is t0 + future in fig2. ``methods`` None: weightedkv alone (ideal has no --methods).
        """
        names = parse_names("weightedkv" if methods is None else methods)
        if sequences < 1 or sinks < 0:
            raise UserError("--sequences >= 1 and --sinks >= 0 are required")
        if not names:
            raise UserError("--methods: choose at least one method")
        if mode == "fig2":
            if t0 < 2 or future < 1:
                raise UserError(f"--t0 >= 2 and --future >= 1 are required (got {t0}, {future})")
            tokens = t0 + future
        budgets = parse_ints(budget, "budget") or [] if mode in ("sweep", "end2end") else []
        settings = cls(mode=mode, tokens=tokens, layers=parse_ints(layers, "layers"), heads=parse_ints(heads, "heads"),
                       methods=names, budgets=budgets,
                       t0=t0 if mode == "fig2" else 100, future=future if mode in ("fig2", "ideal") else 0,
                       steps=parse_ints(steps, "steps") if mode == "ideal" else [100], sinks=sinks, recent=recent,
                       seed=seed)
        if mode == "ideal" and (settings.future < 1 or not settings.steps):
            raise UserError("--future >= 1 and at least one --steps value are required")
        settings.validate()
        return settings

    def check_model(self, config: dict) -> None:
        n, h = config["num_layers"], config["num_kv_heads"]
        if self.layers and (min(self.layers) < 0 or max(self.layers) >= n):
            raise UserError(f"--layers must lie in 0..{n - 1} (the model has {n} layers), got {self.layers}")
        if self.heads and (min(self.heads) < 0 or max(self.heads) >= h):
            raise UserError(f"--heads must lie in 0..{h - 1} (the model has {h} KV heads), got {self.heads}")


def jobs_of(settings: Settings) -> list[Job]:
    """The study's configured methods: the reference once (if asked), every other method per budget."""
    return make_jobs(settings.methods, settings.budgets, PolicyOptions(settings.sinks, settings.recent, settings.seed))


def run_study(loaded: LoadedModel, sequences: list[tuple[str, list[int]]], settings: Settings, progress=None,
              source: dict | None = None) -> tuple[dict, dict]:
    """(summary, tensors) of one study; ``progress(n)`` is called after each unit of work."""

    config = loaded.summary()
    settings.check_model(config)
    # Sliding-window layers (Gemma 2/3) are not compressed by CompressedCache: the per-layer studies leave
    # them out (asked for by number: one-line error); end2end runs the whole model, every layer as it is.
    layers = (settings.layers or list(range(config["num_layers"])) if settings.mode == "end2end"
              else compressed_layers(loaded.model.config, settings.layers))
    per_seq: dict = {}
    for text_id, ids in sequences:
        if settings.mode == "end2end":

            with torch.inference_mode():
                res = end_to_end(loaded.model, torch.tensor(ids, device=loaded.device), jobs_of(settings))
            for key, value in res.items():
                per_seq.setdefault(key, []).append(value)
        else:
            capture = capture_sequences(loaded, [(text_id, ids)], layers=layers, kinds=KINDS, progress=False)
            with torch.inference_mode():
                if settings.mode == "fig2":
                    jobs = pair_jobs(settings.t0, settings.sinks, settings.recent, settings.methods)
                    for key, value in fig2_sequence(capture, layers, jobs, settings.t0, settings.future).items():
                        per_seq.setdefault(key, []).append(value)
                elif settings.mode == "sweep":
                    curves, means, labels = teacher_forced_sequence(capture, layers, jobs_of(settings))
                    per_seq.setdefault("curves", []).append(curves)
                    per_seq.setdefault("means", []).append(means)
                    per_seq["labels"] = labels
                else:

                    for key, value in ideal_sequence(capture, layers, settings.steps, settings.future,
                                                     settings.sinks, settings.recent).items():
                        per_seq.setdefault(key, []).append(value)
            del capture
        if progress:
            progress(1)
    rows, tensors = _summarise(settings, per_seq, layers)
    if settings.heads is not None:
        rows = [r for r in rows if r["kv_head"] is None or r["kv_head"] in settings.heads]
    summary = {"mode": settings.mode, "model": loaded.model_id, "source": source, "config": config,
               "sequences": len(sequences), "tokens": settings.tokens, "text_ids": [t for t, _ in sequences],
               "layers": layers, "methods": settings.methods,
               "budgets": settings.budgets if settings.mode in ("sweep", "end2end") else None,
               "t0": settings.t0, "future": settings.future, "steps": settings.steps, "sinks": settings.sinks,
               "recent": settings.recent, "seed": settings.seed, "results": rows}
    return summary, tensors


def _summarise(settings: Settings, per_seq: dict, layers: list[int]) -> tuple[list[dict], dict]:

    rows, tensors = [], {}
    mode = settings.mode
    if mode == "fig2":
        for (metric, method), values in per_seq.items():
            curves = torch.stack(values)  # (S, L, H, N)
            rows += summary_rows(curves.mean(-1), curves, {"mode": mode, "metric": metric, "method": method,
                                                           "budget": None}, layers)
            tensors[f"{metric}/{method}"] = curves.mean(0)
    elif mode == "sweep":
        curves, means = torch.stack(per_seq["curves"]), torch.stack(per_seq["means"])  # (S, J, L, H, T), (S, J, L, H)
        for j, (method, budget) in enumerate(per_seq["labels"]):
            budget = budget if compresses(method) else None
            rows += summary_rows(means[:, j], curves[:, j], {"mode": mode, "metric": "rel_error",
                                                                        "method": method, "budget": budget}, layers)
            tensors[f"rel_error/{method}/{budget}"] = curves[:, j].mean(0)
    elif mode == "end2end":
        # (S, J, T-1), (S, J, L, T-1)
        kl, dnll, dev = (torch.stack(per_seq[k]) for k in ("kl", "delta_nll", "deviation"))
        for j, job in enumerate(jobs_of(settings)):
            method, budget = job.method, job.budget
            start = min(budget or kl.shape[-1], kl.shape[-1] - 1) if job.compresses else 0
            labels = {"mode": mode, "method": method, "budget": budget}
            for metric, values in (("kl", kl[:, j]), ("delta_nll", dnll[:, j])):
                row = summary_rows(values[:, None, None, start:].mean(-1), values[:, None, None],
                                   labels | {"metric": metric}, [None])[-1]
                rows.append(row | {"mean_all_positions": float(values.mean()), "from_position": start})
                tensors[f"{metric}/{method}/{budget}"] = values.mean(0)
            rows += summary_rows(dev[:, j, :, start:].mean(-1), None, labels | {"metric": "attn_deviation"},
                                 list(range(dev.shape[2])), kv_heads=False)[:-1]
            tensors[f"attn_deviation/{method}/{budget}"] = dev[:, j].mean(0)
    else:
        for method, values in per_seq.items():
            stacked = torch.cat(values)  # (S * steps, L, H, 2): each (sequence, step) a sample
            for k, metric in enumerate(("at_merge", "future")):
                rows += summary_rows(stacked[..., k], None, {"mode": mode, "metric": metric, "method": method,
                                                              "budget": None}, layers)
                # per layer (mean over heads) for the ideal figure's layer selector
                rows += [r | {"kv_head": None} for r in summary_rows(stacked[..., k].mean(-1), None,
                         {"mode": mode, "metric": metric, "method": method, "budget": None}, layers,
                         kv_heads=False)[:-1]]
    return rows, {k: v.contiguous().float() for k, v in tensors.items()}


def paired_lines(summary: dict, method: str = "weightedkv", other: str = "weightedkv_evict") -> list[str]:
    """Per metric and budget: in how many sequences ``method``'s overall value is below ``other``'s."""
    overall = {(r["metric"], r["method"], r["budget"]): r.get("per_sequence") for r in summary["results"]
               if r["layer"] is None and r["kv_head"] is None}
    lines = []
    for (metric, name, budget), values in overall.items():
        base = overall.get((metric, other, budget))
        if name != method or values is None or base is None:
            continue
        lower = sum(a < b for a, b in zip(values, base))
        at = f" m={budget}" if budget is not None else ""
        lines.append(f"{metric}{at}: {method} below {other} in {lower} of {len(values)} sequences (paired)")
    return lines


def rows_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def check_result_dir(out: str | Path, model: str) -> None:
    """Refuse to replace a study made with another model than ``model``."""

    path = Path(out) / RESULTS
    if path.is_file():
        before = json.loads(path.read_text()).get("model")
        if before != model:
            raise UserError(f"{out} holds a study of model {before!r}, not of --model {model!r}: choose another --out")
