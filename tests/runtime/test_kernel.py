"""The grouped eager attention equals each family's own eager attention, weights included."""

from __future__ import annotations

import pytest
import torch

from analysis.runtime import kernel as attention
from tests.conftest import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_same_logits_and_weights_as_eager(tiny_model, random_ids, family):
    model, ids = tiny_model(family), random_ids(2, 24, seed=7)
    with torch.inference_mode():
        want = model(ids, output_attentions=True)
        model.set_attn_implementation(attention.register())
        try:
            got = model(ids, output_attentions=True)
        finally:
            model.set_attn_implementation("eager")
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    for a, b in zip(got.attentions, want.attentions):
        assert torch.allclose(a, b, atol=1e-6)


def test_grouped_path_is_taken_for_gqa_and_not_for_gpt2(tiny_model):
    llama_attn = tiny_model("llama").model.layers[0].self_attn
    assert llama_attn.num_key_value_groups == 2 and attention._plain(llama_attn, {"scaling": 0.25})
    assert not attention._plain(llama_attn, {"scaling": 0.25, "softcap": 30.0})  # unknown option: family eager
    gpt2_attn = tiny_model("gpt2").transformer.h[0].attn
    assert not attention._plain(gpt2_attn, {})


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_real_forward_takes_the_grouped_path(tiny_model, random_ids, family, monkeypatch):
    """With the family's eager made unusable, the forward still works: no silent fallback."""
    model = tiny_model(family)
    family_module = attention._family(model.model.layers[0].self_attn)
    monkeypatch.setattr(family_module, "eager_attention_forward", lambda *a, **k: 1 / 0)
    model.set_attn_implementation(attention.register())
    try:
        with torch.inference_mode():
            model(random_ids(1, 8))
    finally:
        model.set_attn_implementation("eager")
