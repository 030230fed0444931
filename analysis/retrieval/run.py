"""Retrieval under a compressed cache: trials x methods as batch rows of one decode, scored and traced.

How the context meets the cache (``mode``):

- ``decode``: as the perplexity evaluator feeds a window (``analysis.runtime.decode.decode_into``, the
  same function): uncompressed chunks up to the smallest budget, then one token per forward,
  compressing each step; the question and the answer follow the same way.
- ``prefill``: what ``generate()`` does with a long prompt: the whole prompt in one forward, ranked
  once by the policy, then the answer one token at a time. The forward is shared: a batch runs it once
  per distinct prompt, then copies the cache to each method's row, where that method compresses it
  (``CompressedCache.hold`` / ``fan_out``); compression comes after a prefill's attention, so sharing
  changes nothing but the cost.

``protect`` keeps the question out of compression (kvpress compresses only the context): the cache
is compressed up to the question, then its budget is opened so that the question and the answer are
appended without evicting anything.

Scores per row: the teacher-forced log-probability of the answer's tokens, and exact match, which is
greedy decoding's answer: greedy follows the teacher-forced path for as long as every answer token is
the argmax, so "every answer token is the argmax" is exactly "the greedy answer is the answer".
``greedy`` > 0 also decodes that many tokens greedily (on a copy of the cache) for display.

Fates (``answer_fates``): once the cache holds the whole prompt, for each answer token of the fact in
the context, the fraction of (compressed layer, KV head) pairs where its value is still in its own
slot (kept; its key too), only as weight inside other slots' values (merged; a merged value has no
key), or nowhere (gone). Read from the cache's mixing record, restricted to those positions.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from analysis.compress import RowPolicies
from analysis.errors import UserError
from analysis.jobs.job import Job
from analysis.ops import uncompressed_prefix
from analysis.retrieval.tasks import Prompt
from analysis.runtime.batching import Batching
from analysis.runtime.cache import CompressedCache, CompressedLayer, Rows
from analysis.runtime.decode import decode_into, default_chunk, vocab_size

PREFILL_BYTES = 1 << 30  # a prefill's (rows, query heads, L, L) float32 attention weights stay under this
EPS = 0.0  # any weight left counts as merged (however diluted: ``weight`` says how much)


@dataclass(frozen=True, eq=False)
class Unit:
    """One row of work: a job (method at a budget) on one trial's prompt."""

    job: Job
    prompt: Prompt

    @property
    def key(self) -> str:
        p = self.prompt
        return f"{self.job.key}|{p.length}|{p.depth}|{p.trial}"

    @property
    def row_id(self) -> int:
        """Seeds a randomised method's draws: the trial's, whatever batch the row lands in."""
        p = self.prompt
        return (p.length * 101 + p.depth) * 1000 + p.trial


def pack(units: list[Unit], batch_size: int, rows_for=None) -> list[list[Unit]]:
    """Batches of units with one length: compressing jobs of one budget together, the reference alone.

    ``rows_for(length)`` (prefill) caps the distinct prompts of one batch, whose attention weights grow with
    length²; every job of a prompt goes in the same batch, so that they share its forward.
    """
    groups: dict[tuple, list[Unit]] = {}
    for u in units:
        tag = ("budget", u.job.budget) if u.job.compresses and u.job.plan is None else ("job", u.job.key)
        groups.setdefault((u.prompt.length, *tag), []).append(u)
    out = []
    for (length, *_), group in groups.items():
        size = batch_size
        if rows_for is not None:  # prefill: a prompt's methods side by side share its one forward
            group = sorted(group, key=lambda u: (u.prompt.depth, u.prompt.trial))  # stable: jobs stay in order
            jobs = len({u.job.key for u in group})
            size = jobs * min(rows_for(length), batch_size // jobs) if batch_size >= jobs else batch_size
        size = max(1, size)
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out


def prefill_rows(model) -> callable:
    """Rows whose (rows, query heads, L, L) attention weights fit ``PREFILL_BYTES``, per length L."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    return lambda length: max(1, PREFILL_BYTES // (heads * length * length * 4))


def open_budget(cache: CompressedCache, extra: int) -> None:
    """Let every compressed layer hold ``extra`` more tokens than its budget: nothing is evicted meanwhile."""
    for layer in cache.layers:
        state = getattr(layer, "state", None)
        if not isinstance(layer, CompressedLayer) or state is None or not layer.policy.compresses:
            continue
        H = state.positions.shape[1]
        budget = state.budget if state.budget is not None else torch.full(
            (1, H), layer.policy.budget, dtype=torch.long, device=state.positions.device)  # (1 or B, H)
        low, high = state.budget_range or (layer.policy.budget, layer.policy.budget)
        state.budget, state.budget_range = budget + extra, (low + extra, high + extra)


def token_fates(cache: CompressedCache, tracked: Tensor) -> dict[str, Tensor]:
    """Per (row, tracked token) (b, T): the fractions of (compressed layer, KV head) pairs where the token's
    value is kept (its own slot is held), merged (only as weight > EPS inside other held slots) or gone;
    they sum to 1. ``weight`` sums its weight over the merged pairs, ``merged_pairs`` counts them.

    ``tracked`` (b, T): the positions the cache's mixing record follows; padding is negative.
    """
    kept = merged = gone = weight = count = 0
    layers = 0
    for layer in cache.layers:
        state = getattr(layer, "state", None)
        if not isinstance(layer, CompressedLayer) or state is None or state.mixing is None:
            continue  # sliding-window layers keep the model's own cache
        pos, t = state.positions, tracked.to(state.positions.device)
        own = (pos[:, :, :, None] == t[:, None, None, :]).any(2)  # (b, H, T): the token's own slot is held
        held = (state.mixing * state.valid[..., None]).sum(2)  # (b, H, T): its total weight in held values
        mixed = ~own & (held > EPS)
        kept = kept + own.float().mean(1)  # (b, T), mean over KV heads
        merged = merged + mixed.float().mean(1)
        gone = gone + (~own & ~mixed).float().mean(1)
        weight = weight + torch.where(mixed, held, 0.0).sum(1)
        count = count + mixed.float().sum(1)
        layers += 1
    if layers == 0:
        raise UserError("no compressed layer holds a mixing record: the fates cannot be read")
    return {"kept": (kept / layers).cpu(), "merged": (merged / layers).cpu(), "gone": (gone / layers).cpu(),
            "weight": weight.cpu(), "merged_pairs": count.cpu()}


def answer_fates(cache: CompressedCache, tracked: Tensor) -> dict[str, Tensor]:
    """Per row (b,): ``token_fates`` averaged over the fact's tokens, and ``weight``, the mean total weight
    a merged token keeps inside other slots (over its merged (layer, KV head) pairs)."""
    fates = token_fates(cache, tracked)
    use = (tracked >= 0).float()  # (b, T)
    n = use.sum(-1).clamp_min(1)  # (b,)
    out = {f: (fates[f] * use).sum(-1) / n for f in ("kept", "merged", "gone")}
    out["weight"] = (fates["weight"] * use).sum(-1) / (fates["merged_pairs"] * use).sum(-1).clamp_min(1)
    return out


def _step(model, cache, tokens: Tensor, start: int) -> Tensor:
    """One forward of ``tokens`` (b, q) at positions start.. through ``cache``: the last logits (b, V)."""
    b, q = tokens.shape
    positions = torch.arange(start, start + q, device=tokens.device).expand(b, -1)  # (b, q)
    out = model(tokens, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def _greedy(model, cache: CompressedCache, first: Tensor, start: int, steps: int) -> Tensor:
    """(b, steps) greedy tokens from logits ``first`` (b, V), on a copy of the cache (left as it was)."""
    saved = copy.deepcopy(cache.layers)
    tokens = [first.argmax(-1)]
    for k in range(steps - 1):
        tokens.append(_step(model, cache, tokens[-1][:, None], start + k).argmax(-1))
    cache.layers = saved
    return torch.stack(tokens, dim=1)


@torch.inference_mode()
def run_batch(model, units: list[Unit], mode: str, protect_from: int | None = None, greedy: int = 0,
              on_prompt=None) -> list[dict]:
    """Decode one batch (every prompt of one length) and score it: one record per unit (see module doc).

    ``protect_from``: where compression stops (the question's start) when the question is kept out of it.
    ``on_prompt(cache, tracked)`` is called once the cache holds the whole prompt (where fates are read).
    """
    device = next(model.parameters()).device
    prompts = [u.prompt for u in units]
    b, L = len(units), prompts[0].length
    A = max(len(p.answer) for p in prompts)
    ids = torch.tensor([list(p.ids) + list(p.answer) + [p.answer[0]] * (A - len(p.answer)) for p in prompts],
                       device=device)  # (b, L + A): answers padded after their end (never read by a scored step)
    T = max(len(p.tracked) for p in prompts)
    tracked = torch.tensor([list(p.tracked) + [-2] * (T - len(p.tracked)) for p in prompts])  # (b, T)
    shared = list(dict.fromkeys((p.depth, p.trial) for p in prompts))  # prefill: one forward per distinct prompt
    index = torch.tensor([shared.index((p.depth, p.trial)) for p in prompts])  # (b,) row -> its prompt's forward
    first_row = torch.tensor([[(p.depth, p.trial) for p in prompts].index(key) for key in shared])  # (U,)
    jobs = list({u.job.key: u.job for u in units}.values())
    if len(jobs) == 1:
        policy, budgets = jobs[0].policy, None
    else:
        keys = [j.key for j in jobs]
        policy = RowPolicies(policies=[j.policy for j in jobs], rows=[keys.index(u.job.key) for u in units])
        budgets = [u.job.budget for u in units]
    rows = Rows(ids=torch.tensor([u.row_id for u in units]), budgets=budgets)
    stop = protect_from if protect_from is not None else L
    chunk = default_chunk(b, vocab_size(model))
    correct = torch.zeros((b, L + A - 1), dtype=torch.bool)
    lowrank = units[0].job.lowrank  # one per grid: every job holds its keys the same way
    mixing = tracked if mode == "decode" else tracked[first_row]  # prefill: the U prompts' rows, fanned out after
    with CompressedCache(model, policy, rows=rows, track_mixing=mixing, lowrank=lowrank) as cache:
        if mode == "decode":  # the perplexity evaluator's feed: chunks while nothing overflows, then token by token
            fed = stop + 1 if protect_from is not None else L
            decode_into(model, ids[:, :fed], cache, uncompressed_prefix(fed, [u.job.budget for u in units]), chunk)
            if protect_from is not None:
                open_budget(cache, L + A - stop)
            first = _step(model, cache, ids[:, fed - 1 : L], fed - 1)
        else:  # one forward ranked once, as generate() does; one per distinct prompt, fanned out to its rows
            cache.hold()
            last = _step(model, cache, ids[first_row, :stop], 0)  # (U, V)
            cache.fan_out(index)  # each row compresses its prompt's cache with its own policy
            first = last[index]
            if protect_from is not None:  # the context was compressed; the question goes in uncompressed
                open_budget(cache, L + A - stop)
                first = _step(model, cache, ids[:, stop:L], stop)
        fates = answer_fates(cache, tracked)
        if on_prompt is not None:
            on_prompt(cache, tracked)
        said = _greedy(model, cache, first, L, greedy).cpu() if greedy else None
        nll = decode_into(model, ids, cache, 0, chunk, start=L, correct=correct).cpu()  # teacher-forced answer
    nll[:, L - 1] = -torch.log_softmax(first.float(), -1).gather(-1, ids[:, L : L + 1])[:, 0].cpu()
    correct[:, L - 1] = (first.argmax(-1) == ids[:, L]).cpu()
    records = []
    for i, (u, p) in enumerate(zip(units, prompts)):
        n = len(p.answer)
        records.append({
            "unit": u.key, "method": u.job.method, "budget": u.job.budget, "length": L, "depth": p.depth,
            "trial": p.trial, "answer": p.answer_text, "correct": bool(correct[i, L - 1 : L - 1 + n].all()),
            "answer_logprob": round(-float(nll[i, L - 1 : L - 1 + n].double().sum()), 5),
            "answer_tokens": n, "needle_start": p.needle[0], "needle_stop": p.needle[1], "source": p.source,
            "fate_kept": round(float(fates["kept"][i]), 5), "fate_merged": round(float(fates["merged"][i]), 5),
            "fate_gone": round(float(fates["gone"][i]), 5), "merged_weight": round(float(fates["weight"][i]), 5),
            "greedy": None if said is None else said[i].tolist(),
        })
    return records


def _batch_path(partial: Path, batch: list[Unit]) -> Path:
    digest = hashlib.sha1("\n".join(u.key for u in batch).encode()).hexdigest()[:16]
    return partial / f"batch-{digest}.json"


def run_units(model, units: list[Unit], mode: str, protect_from=None, batching: Batching | None = None,
              greedy: int = 0) -> list[dict]:
    """Every unit's record, in the order of ``units``; finished batches kept in ``batching.partial`` (resume)."""
    batching = batching or Batching()
    if batching.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batching.batch_size}")
    done: dict[str, dict] = {}
    if batching.partial is not None and batching.partial.is_dir():
        for path in sorted(batching.partial.glob("batch-*.json")):
            for record in json.loads(path.read_text()):
                done[record["unit"]] = record
    wanted = {u.key for u in units}
    if batching.progress is not None:
        batching.progress(len(wanted & set(done)))
    todo = [u for u in units if u.key not in done]
    rows_for = prefill_rows(model) if mode == "prefill" else None
    for batch in pack(todo, batching.batch_size, rows_for):
        start = protect_from(batch[0].prompt.length) if protect_from is not None else None
        records = run_batch(model, batch, mode, start, greedy)
        for record in records:
            done[record["unit"]] = record
        if batching.partial is not None:
            batching.partial.mkdir(parents=True, exist_ok=True)
            path = _batch_path(batching.partial, batch)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(records))
            tmp.replace(path)
        if batching.progress is not None:
            batching.progress(len(batch))
    return [done[u.key] for u in units]
