"""generate() after a long prompt (``experiments.bench.compress`` prompt; results in docs/benchmarks.md)."""

from __future__ import annotations

import time

import torch

from analysis.runtime.cache import CompressedCache
from analysis.text.corpora import load_documents


def bench_prompt(loaded, args) -> None:
    """generate() after the Generate page's default Austen prompt: compressed (m=64) vs full."""

    text = next(d for d in load_documents(corpus="books") if "pride" in d.id.lower()).text[:6000]
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids[:, : args.window].to(loaded.device)
    rows = []
    for method, budget in (("full", None), ("weightedkv", 64)):
        cache = CompressedCache(loaded.model, method, budget)
        began = time.perf_counter()
        with torch.inference_mode():
            loaded.model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=48,
                                  min_new_tokens=48, do_sample=False, pad_token_id=0)
        rows.append((method, budget, time.perf_counter() - began))
        getattr(cache, "close", lambda: None)()
    print(f"\n### generate(): {ids.shape[1]}-token prompt, 48 new tokens\n")
    print("| cache | seconds |\n|---|---|")
    for method, budget, sec in rows:
        print(f"| {method} m={budget or 'all'} | {sec:.1f} |")
