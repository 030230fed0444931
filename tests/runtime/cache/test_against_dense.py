"""Merging methods inside the real model: CompressedCache against a plain, dense step-by-step decoder.

The reference decodes with a plain ``DynamicLayer`` cache and the model's own eager attention
(``output_attentions``); after every step it applies the policy to a dense, position-ordered
``LayerState`` built from what the model computed, and writes the survivors back. No fixed-capacity
slots, no slot masks, no kvlens attention: if the in-model mechanics of ``CompressedCache`` changed
what a method does, the per-token NLL would differ.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from analysis.compress import LayerState, make_policy
from analysis.runtime.cache import CompressedCache
from analysis.text.corpora import load_documents, token_sequences

T, BUDGET, SINKS = 48, 24, 4


def dense_reference_nll(model, ids, method, dtype):
    policy = make_policy(method, BUDGET, sinks=SINKS)
    cache, states = DynamicCache(), {}
    nll = []
    with torch.inference_mode():
        for t in range(ids.shape[1] - 1):
            out = model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((ids.shape[0], 1), t),
                        output_attentions=True, use_cache=True)
            logp = torch.log_softmax(out.logits[:, -1].float(), -1)
            nll.append(-logp.gather(-1, ids[:, t + 1 : t + 2])[:, 0])
            for i, layer in enumerate(cache.layers):
                state = states.get(i)
                if state is None:
                    state = states[i] = LayerState.empty(layer.keys, layer.values, stats=policy.stats, layer=i)
                state.append(layer.keys[:, :, -1:], layer.values[:, :, -1:])  # the token just attended
                state.observe(out.attentions[i].float())  # dense slots: index = position order
                policy.compress(state)
                state = states[i] = state.ordered()  # dense again, as a plain cache holds it
                layer.keys, layer.values = state.keys.to(dtype), state.values.to(dtype)
    return torch.stack(nll, 1)


def compressed_nll(model, ids, method):
    nll = []
    with torch.inference_mode(), CompressedCache(model, method, BUDGET, sinks=SINKS) as cache:
        for t in range(ids.shape[1] - 1):
            logits = model(ids[:, t : t + 1], past_key_values=cache, position_ids=torch.full((ids.shape[0], 1), t),
                           use_cache=True).logits
            logp = torch.log_softmax(logits[:, -1].float(), -1)
            nll.append(-logp.gather(-1, ids[:, t + 1 : t + 2])[:, 0])
    return torch.stack(nll, 1)


@pytest.fixture(scope="module")
def austen(embedded):

    seqs = token_sequences(embedded.tokenizer, load_documents(corpus="books"), T, 2)
    return torch.tensor([ids for _, ids in seqs])  # (2, T)


# Largest per-token NLL difference allowed (measured on this test's 2 x 47 predictions: float32
# 1.7e-5, bfloat16 0.092, float16 0.016; on an AMD EPYC without AVX512-BF16, bfloat16 0.212 for both
# methods, at the commit before the library moved into subpackages too). The paths differ only in
# summation order (grouped matmul vs repeat_kv, slot order), which half precision rounds differently
# at every layer, and the CPU's bfloat16 kernels decide how.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.3, torch.float16: 0.05}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["weightedkv", "cam"])
def test_compressed_cache_equals_dense_stepwise_policy(embedded, austen, method, dtype):
    # a copy: casting the shared model to half precision and back would round its weights for later tests
    model = embedded.model if dtype == torch.float32 else copy.deepcopy(embedded.model).to(dtype)
    got = compressed_nll(model, austen, method)
    want = dense_reference_nll(model, austen, method, dtype)
    assert model.config._attn_implementation == "eager"  # the reference ran the model's own eager
    worst = (got - want).abs().max().item()
    assert worst <= TOLERANCE[dtype], f"{method} {dtype}: NLL differs by {worst:.3g}"
    full = compressed_nll(model, austen, "full") if dtype == torch.float32 else None
    if full is not None:  # the comparison can fail: compression does move the NLL past the budget
        assert (got[:, BUDGET + 4 :] - full[:, BUDGET + 4 :]).abs().max() > 10 * TOLERANCE[dtype]
