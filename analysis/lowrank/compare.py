"""Channel against token compression at equal cache bytes: perplexity of every family per byte fraction.

Bytes are those of one sequence's cache at the end of a window of W tokens, per (layer, KV head):
the full cache holds W slots of 2 d x dtype. A fraction f of that is B = f W 2 d dtype, and

- ``token`` (eviction: StreamingLLM, H2O, TOVA, the WeightedKV eviction ablation) and ``merge``
  (WeightedKV, CaM) hold m = B / (2 d dtype) = f W slots;
- ``lowrank`` keeps every token (``full``) and stores keys in r_k and values in r_v dimensions,
  r_k + r_v = 2 d f; keys alone (values full) reach only f >= (1 + d) / 2 d, so below that the
  values are low-rank too (measured, not assumed: the spectra predict values suffer);
- ``combined`` runs a token method with rank-r_k keys: m = B / ((r_k + d) dtype) slots.

Each configuration is one ``Job`` (a policy, and a ``LowRank`` when channels are compressed) run by
the perplexity evaluator on the same windows, so every family goes through the same cache code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from analysis.compress import PolicyOptions, method_names
from analysis.errors import UserError
from analysis.jobs.basis import Basis, LowRank, slot_bytes, slots_for_bytes
from analysis.jobs.job import Job
from analysis.models.loading import LoadedModel
from analysis.perplexity.runner import run_jobs
from analysis.perplexity.windows import Windows, summarise
from analysis.runtime.batching import Batching

FAMILIES = ("token", "merge", "lowrank", "combined")
TOKEN_METHODS = tuple(m for m in method_names(compressing=True, merging=False, in_paper=True))
MERGE_METHODS = tuple(method_names(compressing=True, merging=True))


@dataclass(frozen=True)
class Config:
    """One configuration: ``method`` at ``slots`` (None: every token) with ranks (None: full width)."""

    family: str
    method: str
    slots: int | None
    key_rank: int | None = None
    value_rank: int | None = None
    key_energy: float | None = None  # per-head ranks instead of ``key_rank``
    key_width: float | None = None  # mean key rank over heads (= key_rank when fixed)

    @property
    def name(self) -> str:
        tokens = f"{self.method}@{self.slots}" if self.slots is not None else "full"
        key = self.key_rank or self.key_energy
        return tokens + (f"+k{key}" if key else "") + (f"+v{self.value_rank}" if self.value_rank else "")


def parse_fractions(value: str) -> list[float]:
    """'0.5,0.25' -> [0.5, 0.25]; each in (0, 1)."""
    try:
        fractions = [float(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--fractions: {value!r} is not a comma list of numbers") from None
    if not fractions:
        raise UserError("--fractions: give at least one fraction")
    bad = [f for f in fractions if not 0 < f < 1]
    if bad:
        raise UserError(f"--fractions: {bad[0]} is not in (0, 1) (fractions of the full cache's bytes)")
    return fractions


def parse_key_specs(value: str, basis: Basis) -> list[tuple[int | None, float | None, float]]:
    """'8,16,0.99' -> [(rank, energy, mean width)]: integers are ranks, fractions per-head energies."""
    specs = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        try:
            number = float(part)
        except ValueError:
            raise UserError(f"--key-ranks: {part!r} is neither a rank nor an energy") from None
        integer = number == int(number) and "." not in part and "e" not in part.lower()
        rank, energy = (int(number), None) if integer else (None, number)
        ranks = basis.ranks("key_pre_rope", rank, energy)  # refuses r out of 1..d, energy outside (0, 1]
        specs.append((rank, energy, float(ranks.float().mean())))
    return specs


def plan_configs(fractions: list[float], head_dim: int, window: int, *, element_size: int = 4,
                 token_methods=TOKEN_METHODS, merge_methods=MERGE_METHODS, combine_methods=("weightedkv", "tova"),
                 key_specs=((8, None, 8.0), (16, None, 16.0)), sinks: int = 4) -> list[Config]:
    """Every configuration of the comparison; the ``full`` reference first, lowrank at its own bytes too.

    ``key_specs``: (rank, energy, mean width) of each key setting (``parse_key_specs``).
    """
    d = head_dim
    for f in fractions:
        if not 0 < f < 1:
            raise UserError(f"--fractions: {f} is not in (0, 1) (fractions of the full cache's bytes)")
    key = lambda spec: dict(key_rank=spec[0], key_energy=spec[1], key_width=spec[2])  # noqa: E731
    configs = [Config("reference", "full", None)]
    configs += [Config("lowrank", "full", None, **key(s)) for s in key_specs]  # keys alone, at (r + d) / 2d
    for f in fractions:
        full_bytes = window * slot_bytes(d, element_size)  # per (layer, KV head)
        m = slots_for_bytes(f * full_bytes, slot_bytes(d, element_size), sinks)
        configs += [Config("token", name, m) for name in token_methods]
        configs += [Config("merge", name, m) for name in merge_methods]
        total = round(2 * d * f)  # r_k + r_v at every token
        if total - d >= 1 and all(s[0] != total - d for s in key_specs):
            configs.append(Config("lowrank", "full", None, total - d, key_width=float(total - d)))
        for spec in key_specs:
            value_rank = round(total - spec[2])
            if 1 <= value_rank < d:
                configs.append(Config("lowrank", "full", None, value_rank=value_rank, **key(spec)))
            m_r = slots_for_bytes(f * full_bytes, slot_bytes(d, element_size, spec[2]), sinks)
            if m_r < window:
                configs += [Config("combined", name, m_r, **key(spec)) for name in combine_methods]
    return list(dict.fromkeys(configs))


def job_of(config: Config, basis: Basis, options: PolicyOptions) -> Job:
    lowrank = (LowRank(basis, key_rank=config.key_rank, key_energy=config.key_energy, value_rank=config.value_rank)
               if config.key_width or config.value_rank else None)
    return replace(Job.of(config.method, config.slots, options), lowrank=lowrank)


def config_bytes(config: Config, layers: int, kv_heads: int, head_dim: int, window: int, element_size: int) -> int:
    """Logical bytes of one sequence's cache at the end of a window (what ``CompressedCache.memory`` counts)."""
    held = min(config.slots, window) if config.slots is not None else window
    return round(layers * kv_heads * held * slot_bytes(head_dim, element_size, config.key_width, config.value_rank))


def run_compare(loaded: LoadedModel, windows: Windows, basis: Basis, configs: list[Config], *, fractions: list[float],
                options: PolicyOptions | None = None, batching: Batching | None = None) -> list[dict]:
    """compare.json's rows: one per configuration, with bytes, the nearest asked fraction, ppl per document."""
    options = options or PolicyOptions()
    basis.check(loaded.model)
    summary = loaded.summary()
    layers, heads, d = summary["num_layers"], summary["num_kv_heads"], summary["head_dim"]
    size = next(loaded.model.parameters()).element_size()
    jobs = [job_of(c, basis, options) for c in configs]
    for job in jobs:
        job.check_window(windows.size)
    nll, seconds = run_jobs(loaded.model, windows, jobs, batching)
    full = layers * heads * windows.size * slot_bytes(d, size)
    rows = []
    for config, job in zip(configs, jobs):
        result = summarise(windows, nll[job.key], job.method, job.label_budget(windows.size), seconds[job.key])
        nbytes = config_bytes(config, layers, heads, d, windows.size, size)
        share = nbytes / full
        nearest = min(fractions, key=lambda f: abs(math.log(f / share))) if fractions else None
        rows.append({
            "config": config.name, "family": config.family, "method": config.method, "bytes": nbytes,
            "fraction": round(share, 6), "target_fraction": nearest if share <= nearest * 1.0001 else None,
            "slots": config.slots if config.slots is not None else windows.size,
            "key_rank": config.key_width, "key_energy": config.key_energy, "value_rank": config.value_rank,
            "ppl": result["ppl"],
            "per_document_ppl": result["per_document_ppl"], "seconds": result["seconds"],
        })
    return rows


def pareto(rows: list[dict]) -> list[str]:
    """Configs on the lower-left front of (bytes, ppl): no other row has fewer or equal bytes and lower ppl."""
    front = []
    for r in rows:
        if not any(o["bytes"] <= r["bytes"] and o["ppl"] < r["ppl"] and o is not r for o in rows):
            front.append(r["config"])
    return front


def goal(rows: list[dict], fraction: float = 0.25) -> dict:
    """At ``fraction`` of the bytes: the best channel (lowrank/combined) row against the best token-only row."""
    at = [r for r in rows if r["target_fraction"] == fraction]
    tokens = [r for r in at if r["family"] in ("token", "merge")]
    channels = [r for r in at if r["family"] in ("lowrank", "combined")]
    if not tokens or not channels:
        return {"fraction": fraction, "met": None}
    best_token, best_channel = min(tokens, key=lambda r: r["ppl"]), min(channels, key=lambda r: r["ppl"])
    docs = sorted(best_token["per_document_ppl"])
    wins = sum(best_channel["per_document_ppl"][d] < best_token["per_document_ppl"][d] for d in docs)
    return {"fraction": fraction, "met": best_channel["ppl"] < best_token["ppl"],
            "best_token": best_token["config"], "best_token_ppl": best_token["ppl"],
            "best_channel": best_channel["config"], "best_channel_ppl": best_channel["ppl"],
            "ppl_difference": best_channel["ppl"] - best_token["ppl"],
            "documents_won": f"{wins}/{len(docs)}"}
