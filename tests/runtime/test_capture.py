"""analysis.runtime.capture on tiny random models of every supported family, and on the embedded model.

References are independent of the recorder: the model's own DynamicCache after a plain forward or
``generate()``, ``output_attentions`` of a plain eager forward, and attention recomputed by hand
from the captured queries and keys.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, FalconConfig

from analysis.errors import UserError
from analysis.models.loading import attention_modules, config_summary
from analysis.runtime.capture import KINDS, apply_rope, capture_sequences, record
from analysis.text.corpora import load_documents, token_sequences
from tests.conftest import CAPTURE_FAMILIES, KEY_NORM_FAMILIES, SLIDING_WINDOW, tiny_config

B, T = 2, 10
ALL = CAPTURE_FAMILIES
ROTARY = [f for f in ALL if f != "gpt2"]


def geometry(model):
    g = config_summary(model.config)
    return g["num_layers"], g["num_heads"], g["num_kv_heads"], g["head_dim"]


def positions(batch: int, length: int) -> torch.Tensor:
    return torch.arange(length).expand(batch, length)


def window_of(model, layer: int) -> int | None:
    """The layer's sliding window, read from the config (not from what capture reads)."""
    types = getattr(model.config, "layer_types", None)
    if types is not None and types[layer] == "sliding_attention":
        return model.config.sliding_window
    return None


def visible(model, layer: int, length: int) -> torch.Tensor:
    """(length, length) bool: query i sees key j (causal, and inside the window on a sliding layer)."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    window = window_of(model, layer)
    return (j <= i) & ((i - j < window) if window else True)


def cached(cache, layer: int):
    """(keys, values) the model's cache holds for a layer: every token, or the last W-1 of a sliding one."""
    return cache.layers[layer].keys, cache.layers[layer].values


def test_key_norm_families_cover_every_norm_layout_and_a_sliding_window(tiny_model):
    """Guard: the tiny configs really exercise what the capture tests below claim to cover."""
    fed = {}
    for family in KEY_NORM_FAMILIES:
        model = tiny_model(family)
        attn = attention_modules(model)[0]
        handle = attn.k_norm.register_forward_hook(lambda m, a, out, f=family: fed.__setitem__(f, tuple(a[0].shape)))
        with torch.no_grad():
            model(torch.zeros(1, 3, dtype=torch.long))
        handle.remove()
    h, d = 2, {"qwen3": 16, "gemma3": 32, "olmo2": 16}
    assert fed == {"qwen3": (1, 3, h, d["qwen3"]), "gemma3": (1, h, 3, d["gemma3"]), "olmo2": (1, 3, h * d["olmo2"])}
    for family in ("gemma2", "gemma3"):
        gemma = tiny_model(family)
        assert [window_of(gemma, i) for i in range(4)] == [SLIDING_WINDOW, None, SLIDING_WINDOW, None]
        assert SLIDING_WINDOW < T and gemma.config.query_pre_attn_scalar != gemma.config.head_dim
    assert tiny_model("gemma2").config.attn_logit_softcapping == 0.05  # small enough to change the weights


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
@pytest.mark.parametrize("family", ALL)
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
@pytest.mark.parametrize("family", ALL)
def test_reapplying_rope_to_pre_rope_keys_gives_post_rope_keys(prefill, family):
    model, _, cap = prefill(family)
    layers, _, _, d = geometry(model)
    for i in range(layers):
        pre, post = cap.get(i, "key_pre_rope"), cap.get(i, "key_post_rope")
        assert (apply_rope(model, pre, positions(B, T), layer=i) - post).abs().max() <= 1e-5
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
    shifted = apply_rope(model, pre, positions(B, T) + 5, layer=1)
    assert (shifted - post).abs().max() > 1e-3


# --- against the model's own cache --------------------------------------------------------------
@pytest.mark.parametrize("family", ALL)
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
        keys, values = cached(cache, i)
        n = keys.shape[2]  # a sliding layer's cache keeps only the last W - 1 tokens
        assert n == (SLIDING_WINDOW - 1 if window_of(model, i) else T), i
        assert cap.get(i, "key_post_rope").shape[2] == T
        assert (cap.get(i, "key_post_rope")[:, :, -n:] - keys).abs().max() <= 1e-5, i
        assert (cap.get(i, "value")[:, :, -n:] - values).abs().max() <= 1e-5, i


@pytest.mark.parametrize("family", ALL)
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
        for ref_cache in (cache, plain_cache):
            for name, ref in zip(("key_post_rope", "value"), cached(ref_cache, i)):
                n = ref.shape[2]  # a sliding layer's cache keeps only the last W - 1 tokens
                assert n == (SLIDING_WINDOW - 1 if window_of(model, i) else L), (i, name)
                assert cap.get(i, name).shape[2] == L
                assert (cap.get(i, name)[:, :, -n:] - ref).abs().max() <= 1e-5, (i, name)
        assert cap.get(i, "query_post_rope").shape[2] == L
        pre = cap.get(i, "key_pre_rope")
        assert (apply_rope(model, pre, positions(B, L), layer=i) - cap.get(i, "key_post_rope")).abs().max() <= 1e-5
    # statistics accumulated over the steps equal one causal forward over the same tokens
    attentions = plain_attentions(model, out[:, :L])
    for i, attn in enumerate(attentions):
        assert (cap.get(i, "attn_received") - attn.sum(dim=2)).abs().max() <= 1e-5, i
        assert torch.equal(cap.get(i, "attn_count"), visible(model, i, L).sum(dim=0).float().expand(B, L)), i
        assert (cap.get(i, "attn_maps") - attn[:, :, 4:9, :9]).abs().max() <= 1e-5, i


# --- attention statistics ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ALL)
def test_attention_statistics_match_direct_attention(prefill, family):
    model, ids, cap = prefill(family)
    layers, hq, hkv, d = geometry(model)
    attentions = plain_attentions(model, ids)
    scale = getattr(model.config, "query_pre_attn_scalar", None) or d  # Gemma scales by its own scalar
    for i, attn in enumerate(attentions):
        seen = visible(model, i, T)
        assert attn.shape == (B, hq, T, T)
        assert torch.all(attn[..., ~seen] == 0)  # the reference itself is causal (and windowed)
        # recompute from the captured post-RoPE queries and keys (GQA: query head h uses KV head h // g)
        q, k = cap.get(i, "query_post_rope"), cap.get(i, "key_post_rope")
        k = k.repeat_interleave(hq // hkv, dim=1)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(scale)
        cap_at = getattr(model.config, "attn_logit_softcapping", None)  # Gemma 2: tanh soft cap
        if cap_at:
            uncapped = logits.masked_fill(~seen, float("-inf")).softmax(dim=-1)
            assert (uncapped - attn).abs().max() > 1e-3, i  # the cap matters here
            logits = torch.tanh(logits / cap_at) * cap_at
        manual = logits.masked_fill(~seen, float("-inf")).softmax(dim=-1)
        assert (manual - attn).abs().max() <= 1e-5, i

        received = cap.get(i, "attn_received")
        assert (received - attn.sum(dim=2)).abs().max() <= 1e-5, i
        assert torch.allclose(received.sum(dim=-1), torch.full((B, hq), float(T)), atol=1e-4)
        kv = cap.get(i, "attn_received_kv")
        for h in range(hkv):
            group = received[:, h * (hq // hkv):(h + 1) * (hq // hkv)]
            assert torch.allclose(kv[:, h], group.mean(dim=1), atol=1e-6), (i, h)
        assert torch.equal(cap.get(i, "attn_count"), seen.sum(dim=0).float().expand(B, T)), i
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


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])  # qwen3: two hooks per layer (k_proj and k_norm)
def test_attention_implementation_and_hooks_restored_after_an_error_inside(tiny_model, random_ids, family):
    model = tiny_model(family)
    before = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with record(model):
            assert hook_count(model) > before  # the guard: record() did install hooks
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert hook_count(model) == before  # and none of them remain


# --- the real embedded model on real text ------------------------------------------------------------
@pytest.mark.slow
def test_embedded_model_on_books(embedded):

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
        assert ((apply_rope(embedded.model, pre, positions(1, 256)) - post).abs().max()
                <= 1e-5 * post.abs().max().clamp_min(1))
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

    config = FalconConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(UserError, match="cannot capture pre-RoPE keys of Falcon"):
        with record(model):
            pass
    with record(model, kinds=("value",)) as rec, torch.inference_mode():
        model(torch.randint(0, 101, (1, 8)))  # Falcon's attention bypasses AttentionInterface
    with pytest.raises(UserError, match="cannot be captured"):
        rec.result()


# --- key norms in every layout, and layouts capture must refuse ---------------------------------------
@pytest.mark.parametrize("family", KEY_NORM_FAMILIES)
def test_pre_rope_keys_when_tokens_equal_kv_heads(tiny_model, random_ids, family):
    """T == H: (B, T, H, D) and (B, H, T, D) have the same shape; the layout must still be right."""
    model = tiny_model(family)
    _, _, hkv, d = geometry(model)
    with record(model, kinds=("key_pre_rope", "key_post_rope")) as rec, torch.no_grad():
        model(random_ids(1, hkv, seed=4), use_cache=True)
    cap = rec.result()
    for i in cap.layers:
        pre, post = cap.get(i, "key_pre_rope"), cap.get(i, "key_post_rope")
        assert pre.shape == post.shape == (1, hkv, hkv, d)
        assert (apply_rope(model, pre, positions(1, hkv), layer=i) - post).abs().max() <= 1e-5, i
        assert (pre.transpose(1, 2) - post).abs().max() > 1e-3  # the other layout would be wrong


class WrongShapeNorm(torch.nn.Module):
    """A key norm that flattens the heads: not a layout capture knows."""

    def forward(self, x):
        return x.flatten(-2)


def fresh(family: str, **overrides):
    """A tiny model of its own (the session's shared ones must not be modified)."""


    torch.manual_seed(0)
    config = tiny_config(family)
    for name, value in overrides.items():
        setattr(config, name, value)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_key_norm_of_a_wrong_shape_is_refused_naming_the_module(random_ids):
    model = fresh("qwen3")
    model.model.layers[2].self_attn.k_norm = WrongShapeNorm()
    with pytest.raises(UserError) as err, torch.no_grad():
        with record(model, layers=[2]):
            model(random_ids(B, T))
    message = str(err.value)
    assert "\n" not in message and "WrongShapeNorm model.layers.2.self_attn.k_norm" in message
    assert f"turned {(B, T, 2, 16)} into {(B, T, 32)}" in message
    assert model.config._attn_implementation == "eager" and hook_count(model) == 0  # nothing left behind


def test_key_norm_fed_something_else_than_the_projection_is_refused(random_ids):
    model = fresh("gemma3")
    norm = model.model.layers[1].self_attn.k_norm
    norm.register_forward_pre_hook(lambda m, args: (args[0] * 2,))  # a step between k_proj and k_norm
    with pytest.raises(UserError, match=r"Gemma3RMSNorm model\.layers\.1\.self_attn\.k_norm: the key norm's input "
                                        r"\(2, 2, 10, 32\) is not the key projection"), torch.no_grad():
        with record(model, layers=[1]):
            model(random_ids(B, T))
    with record(model, layers=[1], kinds=("key_post_rope",)) as rec, torch.no_grad():  # other kinds still work
        model(random_ids(B, T))
    assert rec.result().get(1, "key_post_rope").shape == (B, 2, T, 32)


def test_attention_handed_an_unexpected_layout_is_refused(random_ids):
    model = fresh("llama")
    model.config.num_key_value_heads = 4  # the config now disagrees with the modules (2 KV heads)
    with pytest.raises(UserError, match=r"cannot capture LlamaAttention model\.layers\.0\.self_attn: key "
                                        r"\(2, 2, 10, 16\) / value \(2, 2, 10, 16\) do not match"), torch.no_grad():
        with record(model, kinds=("value",)):
            model(random_ids(B, T))


def test_non_causal_attention_is_refused(random_ids):
    model = fresh("gemma3", use_bidirectional_attention=True)
    with pytest.raises(UserError, match=r"Gemma3Attention model\.layers\.0\.self_attn: its attention is not causal"):
        with record(model, kinds=("value",)), torch.no_grad():
            model(random_ids(B, T))


def test_tokens_cached_before_recording_are_refused(tiny_model, random_ids):
    model = tiny_model("llama")
    ids = random_ids(B, T)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        with pytest.raises(UserError, match=r"keys cover 10 tokens but 4 were recorded"):
            with record(model, kinds=("value",)):
                model(ids[:, 6:], past_key_values=cache, use_cache=True)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3"])
def test_chunked_prefill_records_what_one_forward_records(prefill, family):
    """Two chunks through one cache inside one record(): on Gemma 3's sliding layers the second chunk is
    handed only the keys its window reaches, and the statistics and maps must not notice."""
    model, ids, whole = prefill(family)
    with torch.no_grad(), record(model, maps_window=(3, 8)) as rec:
        cache = DynamicCache(config=model.config)
        model(ids[:, :6], past_key_values=cache, use_cache=True)
        model(ids[:, 6:], past_key_values=cache, use_cache=True)
    chunked = rec.result()
    assert set(chunked.tensors) == set(whole.tensors)
    if family != "llama":
        assert cache.layers[0].keys.shape[2] == SLIDING_WINDOW - 1  # the dropping path was taken
    for key, ref in whole.tensors.items():
        assert chunked.tensors[key].shape == ref.shape, key
        assert (chunked.tensors[key] - ref).abs().max() <= 1e-5, key
