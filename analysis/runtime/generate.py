"""Generate text from a prompt through a CompressedCache, and report what the cache kept.

Plain data in and out, no streamlit: the Generate page calls it (through the dashboard's model lock).
Sliding-window layers (Gemma 2/3) keep the model's own sliding cache; the reported occupancy shows
them holding up to their window, the other layers their budget.
"""

from __future__ import annotations

import time

import torch

from analysis.errors import UserError
from analysis.jobs import Job
from analysis.models.loading import LoadedModel
from analysis.runtime.cache import CompressedCache


def generate_text(loaded: LoadedModel, prompt: str, job: Job, new: int, sample: bool, temperature: float,
                  seed: int) -> dict:
    """Generate ``new`` tokens after ``prompt`` with ``loaded`` through a CompressedCache under ``job``.

    The job carries the method, its budget or per-(layer, KV head) plan and any low-rank channels; ``seed``
    seeds sampling. Returns the text and the cache afterwards (occupancy, tokens seen, memory, kept positions per head).
    The cache hooks the model and switches its attention while open: callers sharing the model serialise calls.
    """
    if not isinstance(job, Job):
        raise UserError(f"give a configured job (analysis.jobs.Job.of(name, budget, ...)), not {job!r}")
    tok = loaded.tokenizer
    ids = torch.tensor([tok.encode(prompt)], device=loaded.device)
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty")
    kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    cache = CompressedCache(loaded.model, job)
    torch.manual_seed(seed)
    began = time.perf_counter()
    with torch.inference_mode(), cache:
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                    max_new_tokens=new, pad_token_id=tok.pad_token_id or tok.eos_token_id, **kwargs)
    seconds = time.perf_counter() - began
    generated = out[0, ids.shape[1]:]
    return {
        "text": tok.decode(generated, skip_special_tokens=True), "prompt_tokens": ids.shape[1],
        "new_tokens": len(generated), "seconds": seconds, "occupancy": cache.occupancy(),
        "seen": [layer.get_seq_length() for layer in cache.layers], "sinks": cache.policy.sinks,
        "recent": cache.policy.recent, "memory": cache.memory(),
        "kept": [_kept(cache, i) for i in range(len(cache.layers))],
    }


def _kept(cache: CompressedCache, i: int) -> list[list[int]]:
    """Positions layer ``i`` holds per KV head (row 0); a sliding layer holds its newest tokens."""
    layer = cache.layers[i]
    if getattr(layer, "state", None) is None:  # the model's own (sliding) cache layer: the last tokens it keeps
        held, seen = layer.keys.shape[2], layer.get_seq_length()
        return [list(range(seen - held, seen))] * layer.keys.shape[1]
    return [[p for p in head if p >= 0] for head in cache.kept_positions(i)[0].tolist()]
