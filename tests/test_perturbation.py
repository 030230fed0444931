"""analysis.perturbation: exact cases by hand, agreement with the cache, and the paper's claim."""

from __future__ import annotations

import pytest
import torch

from analysis.capture import record
from analysis.compress import LayerState
from analysis.errors import UserError
from analysis.perturbation import PAIR, perturb, perturb_state, perturbation_study, state_at

NEG = -1.0e4  # a score whose softmax weight underflows to exactly 0 in float32


def hand_state(keys: torch.Tensor, values: torch.Tensor, avg: torch.Tensor) -> LayerState:
    """A (1, 1, t, D) state whose average attention a / n is ``avg`` (t,)."""
    t = keys.shape[0]
    state = LayerState.empty(keys[None, None], values[None, None])
    state.append(keys[None, None], values[None, None], torch.arange(t))
    state.count = torch.arange(t, 0, -1, dtype=torch.float32)[None, None]  # causal: slot i seen t - i times
    state.acc = avg[None, None] * state.count
    return state


def setup(t=8, victim=3, D=4, seed=0):
    """Keys whose score with the future query q = e0 is NEG except where stated; distinct values."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.zeros(t, D)
    keys[:, 0] = NEG  # score q . k / sqrt(D) = NEG / 2 with q = e0: weight exactly 0
    values = torch.randn(t, D, generator=gen)
    avg = torch.full((t,), 0.5)
    avg[victim] = 0.1
    q = torch.zeros(1, 2, 1, D)  # (B, Hq=2, F=1, D): two query heads share the single KV head
    q[..., 0] = 1.0
    future_k = torch.zeros(1, 1, 1, D)
    future_k[..., 0] = NEG  # the future token itself is not attended either
    return keys, values, avg, q, future_k, torch.randn(1, 1, 1, D, generator=gen)


def test_evicting_an_unattended_token_is_exact():
    keys, values, avg, q, fk, fv = setup()
    keys[[0, 4], 0] = 0.0  # the future query attends only to tokens 0 and 4; victim 3 gets exactly 0
    res = perturb_state(hand_state(keys, values, avg), q, fk, fv, sinks=1)
    assert res["weightedkv"]["victim"].item() == 3
    assert res["weightedkv_evict"]["rel_error"].max().item() <= 1e-6
    assert res["weightedkv_evict"]["attn_cosine_padded"].min().item() >= 1 - 1e-6
    assert res["weightedkv"]["rel_error"].min().item() > 1e-3  # merging v_3 into v_4 does disturb


def test_merge_is_ideal_for_identical_keys_in_the_attention_ratio():
    """k_3 = k_4 hold all the query's attention (ratio 1 : 1) and ā_3 = ā_4: ṽ reproduces o exactly."""
    keys, values, avg, q, fk, fv = setup()
    keys[[3, 4], 0] = 0.0  # identical keys, equal current attention 1/2 each
    avg[4] = avg[3]  # ā_3 : ā_4 = 1 : 1 = the current ratio; argmin takes the first, j = 3
    res = perturb_state(hand_state(keys, values, avg), q, fk, fv, sinks=1)
    assert res["weightedkv"]["victim"].item() == 3
    assert res["weightedkv"]["rel_error"].max().item() <= 1e-5
    assert res["weightedkv_evict"]["rel_error"].min().item() > 0.1
    assert res["weightedkv"]["attn_cosine"].min().item() >= 1 - 1e-6  # surviving keys are untouched


def test_state_at_equals_full_cache_and_capture(tiny_model, random_ids):
    from analysis.cache import CompressedCache

    model, ids, t = tiny_model("llama"), random_ids(2, 20, seed=3), 12
    with record(model) as rec, torch.inference_mode():
        model(ids)
    cap = rec.result()
    with record(model) as rec, torch.inference_mode():  # only the first t queries
        model(ids[:, :t])
    prefix = rec.result()
    cache = CompressedCache(model, "weightedkv", 16, sinks=2)  # budget > t: nothing compressed yet
    with torch.inference_mode(), cache:
        model(ids[:, :t], past_key_values=cache)
    for layer in (0, 3):
        ref = cache.layers[layer].state  # a fresh cache fills its slots in position order
        for row in range(2):
            s = state_at(cap, layer, t, row)
            for name in ("keys", "values") + ref.stats:
                assert torch.allclose(getattr(s, name)[0], getattr(ref, name)[row, :, :t], atol=1e-5), name
            assert torch.equal(s.positions[0], ref.positions[row, :, :t])
            assert torch.allclose(s.acc[0], prefix.get(layer, "attn_received_kv")[row], atol=1e-5)
        full = state_at(cap, layer, 20, 1)  # all captured queries: the capture's own statistics
        assert torch.allclose(full.acc[0], cap.get(layer, "attn_received_kv")[1], atol=1e-5)
    with pytest.raises(UserError):
        perturb(cap, 0, 15, future=6)
    out = perturb(cap, 1, 12, future=4, methods=PAIR + ("h2o",))
    assert out["weightedkv"]["victim"] == out["weightedkv_evict"]["victim"]
    assert len(out["h2o"]["rel_error"]["per_step"]) == 4


@pytest.fixture(scope="module")
def books_capture(embedded):
    from analysis.capture import capture_sequences
    from analysis.corpora import load_documents, token_sequences

    seqs = token_sequences(embedded.tokenizer, load_documents(corpus="books"), 320, 1)
    return capture_sequences(embedded, seqs, layers=[2, 10, 20, 28],
                             kinds=("query_post_rope", "key_post_rope", "value"), progress=False)


# strict: this records a measurement, not a hope. If the merge ever does beat eviction here (a fix
# in the merge, another model), the unexpected pass fails the suite and the note must be updated.
@pytest.mark.xfail(strict=True, reason=(
    "paper's claim not reproduced on SmolLM2-135M/books: mean rel. output error after the merge "
    "5.14e-4 vs 3.90e-4 after evicting the same token; merge closer in 30.6% of 36 (layer, KV head, t) "
    "cases (320 tokens, layers 2,10,20,28, t=96,192,288, future 16). At 8 x 1024 tokens, 7 layers, "
    "t=256,512,768, future 200: 2.45e-4 vs 2.37e-4, merge closer in 42% of 504 cases"))
def test_merge_perturbs_less_than_evicting_the_same_token(books_capture):
    """The paper's claim (§IV): folding the victim's value into its neighbour beats dropping it."""
    study = perturbation_study(books_capture, steps=(96, 192, 288), future=16)
    merge, evict = (study["methods"][m]["rel_error"]["mean"] for m in PAIR)
    assert merge < evict, (merge, evict, study["merge_vs_evict"])
