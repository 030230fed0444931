"""analysis.capture on tiny random models of every supported family, and on the embedded model.

References are independent of the recorder: the model's own DynamicCache after a plain forward or
``generate()``, ``output_attentions`` of a plain eager forward, and attention recomputed by hand
from the captured queries and keys.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

from analysis.capture import KINDS, apply_rope, capture_sequences, record
from analysis.errors import UserError
from analysis.models import config_summary
from tests.conftest import FAMILIES

B, T = 2, 10
ROTARY = [f for f in FAMILIES if f != "gpt2"]


def geometry(model):
    g = config_summary(model.config)
    return g["num_layers"], g["num_heads"], g["num_kv_heads"], g["head_dim"]


def positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).expand(batch, length)


@pytest.fixture(scope="module")
def prefill(tiny_model, random_ids):
    """Per family: (model, ids, capture of a T-token prefill with every kind, stat and a map window)."""
    done = {}

    def get(family):
        if family not in done:
            model = tiny_model(family)
            ids = random_ids(B, T, seed=1)
            with record(model, maps_window=(3, 8)) as rec, torch.no_grad():
                model(ids, use_cache=True)
            done[family] = (model, ids, rec.result())
        return done[family]

    return get


def plain_attentions(model, ids):
    """Eager attention weights of a forward that does not record: per layer (B, Hq, T, T)."""
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    assert out.attentions is not None and len(out.attentions) == model.config.num_hidden_layers
    return out.attentions


# --- shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_of_every_kind_and_stat(prefill, family):
    model, _, cap = prefill(family)
    layers, hq, hkv, d = geometry(model)
    assert cap.layers == list(range(layers)) and cap.kinds == list(KINDS)
    assert cap.meta["tokens"] == T and cap.meta["dtype"] == "float32" and tuple(cap.meta["maps_window"]) == (3, 8)
    for i in range(layers):
        expect = {
            "query_post_rope": (B, hq, T, d),
            "key_pre_rope": (B, hkv, T, d),
            "key_post_rope": (B, hkv, T, d),
            "value": (B, hkv, T, d),
            "attn_received": (B, hq, T),
            "attn_received_kv": (B, hkv, T),
            "attn_count": (B, T),
            "attn_maps": (B, hq, 8 - 3, 8),
        }
        for name, shape in expect.items():
            t = cap.get(i, name)
            assert tuple(t.shape) == shape, (i, name)
            assert t.dtype == torch.float32 and t.device.type == "cpu" and torch.isfinite(t).all(), (i, name)
    assert len(cap.tensors) == layers * 8


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stats_without_kv_kinds_still_have_kv_heads(tiny_model, random_ids, family):
    model = tiny_model(family)
    _, hq, hkv, d = geometry(model)
    for kinds in [("query_post_rope",), ("key_pre_rope",)]:
        with record(model, kinds=kinds) as rec, torch.no_grad():
            model(random_ids(B, T), use_cache=True)
        cap = rec.result()
        names = {k.split(".", 2)[2] for k in cap.tensors}
        assert names == set(kinds) | {"attn_received", "attn_received_kv", "attn_count"}
        assert tuple(cap.get(0, "attn_received_kv").shape) == (B, hkv, T)


# --- RoPE -------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_reapplying_rope_to_pre_rope_keys_gives_post_rope_keys(prefill, family):
    model, _, cap = prefill(family)
    layers, _, _, d = geometry(model)
    for i in range(layers):
        pre, post = cap.get(i, "key_pre_rope"), cap.get(i, "key_post_rope")
        assert (apply_rope(model, pre, positions(B, T)) - post).abs().max() <= 1e-5
        moved = (pre - post).abs().amax(dim=(0, 1, 2))  # (D,) largest change per feature
        if family == "gpt2":
            assert torch.equal(pre, post)  # absolute positions: keys carry no rotation
        elif family == "gpt_neox":  # rotary_pct 0.25: only the first quarter of each head rotates
            assert model.config.rope_parameters["partial_rotary_factor"] == 0.25
            rotary = d // 4
            assert torch.equal(pre[..., rotary:], post[..., rotary:])
            assert moved[:rotary].min() > 1e-4
        else:
            assert moved.max() > 1e-2  # the rotation is real, so the round trip means something
        # position 0 is never rotated
        assert torch.allclose(pre[:, :, 0], post[:, :, 0], atol=1e-6)


@pytest.mark.parametrize("family", ROTARY)
def test_apply_rope_uses_the_positions_given(prefill, family):
    model, _, cap = prefill(family)
    pre, post = cap.get(1, "key_pre_rope"), cap.get(1, "key_post_rope")
    shifted = apply_rope(model, pre, positions(B, T) + 5)
    assert (shifted - post).abs().max() > 1e-3


# --- against the model's own cache --------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_capture_equals_dynamic_cache_and_changes_nothing(tiny_model, random_ids, family):
    model = tiny_model(family)
    ids = random_ids(B, T, seed=2)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        plain = model(ids, past_key_values=cache, use_cache=True).logits
        with record(model) as rec:
            recorded = model(ids, use_cache=True).logits
    cap = rec.result()
    assert model.config._attn_implementation == "eager"  # restored
    assert (recorded - plain).abs().max() <= 1e-5  # recording must not change the model
    for i in range(model.config.num_hidden_layers):
        assert (cap.get(i, "key_post_rope") - cache.layers[i].keys).abs().max() <= 1e-5, i
        assert (cap.get(i, "value") - cache.layers[i].values).abs().max() <= 1e-5, i


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_capture_spans_prefill_and_steps(tiny_model, random_ids, family):
    model = tiny_model(family)
    prompt, new = 6, 4
    ids = random_ids(B, prompt, seed=3)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                  do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain_cache = DynamicCache(config=model.config)
        plain = model.generate(ids, past_key_values=plain_cache, **kwargs)
        cache = DynamicCache(config=model.config)
        with record(model, maps_window=(4, 9)) as rec:
            out = model.generate(ids, past_key_values=cache, **kwargs)
    cap = rec.result()
    L = prompt + new - 1  # the last generated token is never fed back
    assert torch.equal(out, plain) and out.shape == (B, prompt + new)
    assert cap.meta["tokens"] == L
    for i in range(model.config.num_hidden_layers):
        for name, ref in (("key_post_rope", cache.layers[i].keys), ("value", cache.layers[i].values)):
            assert cap.get(i, name).shape[2] == L
            assert (cap.get(i, name) - ref).abs().max() <= 1e-5, (i, name)
            ref_plain = plain_cache.layers[i].keys if name == "key_post_rope" else plain_cache.layers[i].values
            assert (cap.get(i, name) - ref_plain).abs().max() <= 1e-5, (i, name)
        assert cap.get(i, "query_post_rope").shape[2] == L
        pre = cap.get(i, "key_pre_rope")
        assert (apply_rope(model, pre, positions(B, L)) - cap.get(i, "key_post_rope")).abs().max() <= 1e-5
    # statistics accumulated over the steps equal one causal forward over the same tokens
    attentions = plain_attentions(model, out[:, :L])
    for i, attn in enumerate(attentions):
        assert (cap.get(i, "attn_received") - attn.sum(dim=2)).abs().max() <= 1e-5, i
        assert torch.equal(cap.get(i, "attn_count"), (L - torch.arange(L)).float().expand(B, L))
        assert (cap.get(i, "attn_maps") - attn[:, :, 4:9, :9]).abs().max() <= 1e-5, i


# --- attention statistics ------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_statistics_match_direct_attention(prefill, family):
    model, ids, cap = prefill(family)
    layers, hq, hkv, d = geometry(model)
    attentions = plain_attentions(model, ids)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i, attn in enumerate(attentions):
        assert attn.shape == (B, hq, T, T)
        assert torch.all(attn[..., ~causal] == 0)  # the reference itself is causal
        # recompute from the captured post-RoPE queries and keys (GQA: query head h uses KV head h // g)
        q, k = cap.get(i, "query_post_rope"), cap.get(i, "key_post_rope")
        k = k.repeat_interleave(hq // hkv, dim=1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        manual = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        assert (manual - attn).abs().max() <= 1e-5, i

        received = cap.get(i, "attn_received")
        assert (received - attn.sum(dim=2)).abs().max() <= 1e-5, i
        assert torch.allclose(received.sum(dim=-1), torch.full((B, hq), float(T)), atol=1e-4)
        kv = cap.get(i, "attn_received_kv")
        for h in range(hkv):
            group = received[:, h * (hq // hkv):(h + 1) * (hq // hkv)]
            assert torch.allclose(kv[:, h], group.mean(dim=1), atol=1e-6), (i, h)
        assert torch.equal(cap.get(i, "attn_count"), (T - torch.arange(T)).float().expand(B, T))
        maps = cap.get(i, "attn_maps")  # query rows 3..7, key columns 0..7
        assert (maps - attn[:, :, 3:8, :8]).abs().max() <= 1e-5, i


def test_gqa_group_mean_differs_from_plain_head_mean(prefill):
    """Guard for the test above: with 2 groups the group mean is not the all-heads mean."""
    _, _, cap = prefill("llama")
    kv, received = cap.get(0, "attn_received_kv"), cap.get(0, "attn_received")
    assert kv.shape[1] == 2 and not torch.allclose(kv[:, 0], received.mean(dim=1), atol=1e-4)


# --- layer filter and bad inputs -------------------------------------------------------------------
def test_layer_filter_records_only_those_layers(tiny_model, random_ids, prefill):
    model, ids, full = prefill("llama")
    with record(model, layers=[1, 3], kinds=("key_post_rope", "value"), stats=False) as rec, torch.no_grad():
        model(ids, use_cache=True)
    cap = rec.result()
    assert cap.layers == [1, 3] and cap.meta["layers"] == [1, 3]
    assert set(cap.tensors) == {f"layers.{i}.{n}" for i in (1, 3) for n in ("key_post_rope", "value")}
    for i in (1, 3):
        assert torch.equal(cap.get(i, "value"), full.get(i, "value"))
    with pytest.raises(UserError, match="layer 0 is not in this capture"):
        cap.get(0, "value")
    with pytest.raises(UserError, match="no 'query_post_rope'"):
        cap.get(1, "query_post_rope")


@pytest.mark.parametrize("kwargs, message", [
    (dict(kinds=("key_post_rope", "keys")), "unknown kind"),
    (dict(layers=[0, 4]), r"layer\(s\) \[4\] out of range"),
    (dict(layers=[-1]), "out of range"),
])
def test_bad_inputs_raise_user_error_and_leave_the_model_alone(tiny_model, kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(UserError, match=message):
        with record(model, **kwargs):
            pass
    assert model.config._attn_implementation == "eager"


def test_attention_implementation_restored_after_an_error_inside(tiny_model, random_ids):
    model = tiny_model("qwen2")
    with pytest.raises(RuntimeError, match="boom"):
        with record(model):
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    with torch.no_grad():  # and no recording hooks remain
        model(random_ids(1, 4))


# --- the real embedded model on real text ------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_on_books(embedded):
    from analysis.corpora import load_documents, token_sequences

    docs = load_documents(corpus="books")
    sequences = token_sequences(embedded.tokenizer, docs, 256, 1)
    cap = capture_sequences(embedded, sequences, layers=[0, 1], progress=False)
    g = embedded.summary()
    assert (g["num_layers"], g["num_heads"], g["num_kv_heads"], g["head_dim"]) == (30, 9, 3, 64)
    assert cap.meta["text_ids"] == [sequences[0][0]] and cap.meta["text_ids"][0].startswith("books/")
    assert cap.meta["token_ids"] == [list(sequences[0][1])] and len(cap.meta["token_ids"][0]) == 256
    assert cap.meta["config"] == g and cap.layers == [0, 1] and cap.meta["positions"] == list(range(256))
    for i in (0, 1):
        assert cap.get(i, "query_post_rope").shape == (1, g["num_heads"], 256, g["head_dim"])
        for name in ("key_pre_rope", "key_post_rope", "value"):
            assert cap.get(i, name).shape == (1, g["num_kv_heads"], 256, g["head_dim"])
        assert cap.get(i, "attn_received_kv").shape == (1, g["num_kv_heads"], 256)
        assert all(torch.isfinite(t).all() for t in cap.tensors.values())
        pre, post = cap.get(i, "key_pre_rope"), cap.get(i, "key_post_rope")
        assert (apply_rope(embedded.model, pre, positions(1, 256)) - post).abs().max() <= 1e-5 * post.abs().max().clamp_min(1)
        assert (pre - post).abs().max() > 1e-2
        assert torch.allclose(cap.get(i, "attn_received").sum(-1), torch.full((1, g["num_heads"]), 256.0), rtol=1e-4)
    # recording does not change the model: same logits as a plain forward
    ids = torch.tensor([sequences[0][1][:64]])
    with torch.no_grad():
        plain = embedded.model(ids).logits
        with record(embedded.model, layers=[0]):
            recorded = embedded.model(ids).logits
    assert (recorded - plain).abs().max() <= 1e-4


def test_unknown_fused_layout_is_refused():
    """Falcon fuses q/k/v differently from GPT-NeoX: refuse rather than return wrong pre-RoPE keys."""
    from transformers import AutoModelForCausalLM, FalconConfig

    config = FalconConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(UserError, match="cannot capture pre-RoPE keys of Falcon"):
        with record(model):
            pass
    with record(model, kinds=("value",)) as rec, torch.inference_mode():
        model(torch.randint(0, 101, (1, 8)))  # Falcon's attention bypasses AttentionInterface
    with pytest.raises(UserError, match="cannot be captured"):
        rec.result()
