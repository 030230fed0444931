"""Behaviour of every compression policy against the paper and against slow loop references."""

from __future__ import annotations

import math

import pytest
import torch

from analysis.compress import METHODS, LayerState, Policy, make_policy
from analysis.compress.cam import CaM
from analysis.compress.weightedkv import WeightedKV
from analysis.errors import UserError
from analysis.ops import uniform

B, H, HQ, D = 2, 3, 6, 4  # GQA: 2 query heads per KV head
SCORED = [m for m in METHODS if m != "full"]


# --- inputs ------------------------------------------------------------------------------------
def chunks(seed: int, sizes: list[int], batch: int = B) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Random (keys, values, positions) blocks of the given token counts."""
    gen = torch.Generator().manual_seed(seed)
    out, start = [], 0
    for q in sizes:
        k = torch.randn(batch, H, q, D, generator=gen)
        v = torch.randn(batch, H, q, D, generator=gen)
        out.append((k, v, torch.arange(start, start + q)))
        start += q
    return out


def causal_attn(seed: int, q: int, L: int, batch: int = B) -> torch.Tensor:
    """(batch, HQ, q, L) softmax weights; new token t (of q) sees slots <= L - q + t."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(batch, HQ, q, L, generator=gen, dtype=torch.float64)
    future = torch.arange(L)[None, :] > (L - q + torch.arange(q)[:, None])  # (q, L)
    return logits.masked_fill(future, -math.inf).softmax(-1).float()


def to_slots(state: LayerState, attn: torch.Tensor) -> torch.Tensor:
    """Attention given over the held tokens oldest first (B, HQ, q, L) -> over the physical slots (B, HQ, q, C)."""
    Bq, Hq, q, L = attn.shape
    order = torch.where(state.valid, state.positions, 10**9).argsort(-1)[..., :L]  # (B, H, L): slot of each token
    order = order.repeat_interleave(Hq // state.positions.shape[1], dim=1)[:, :, None].expand(Bq, Hq, q, L)
    return attn.new_zeros((Bq, Hq, q, state.capacity)).scatter(3, order, attn)


def run(policy: Policy, blocks, attn_seed: int, attn_fn=causal_attn) -> LayerState:
    state = None
    for step, (k, v, pos) in enumerate(blocks):
        state = state or LayerState.empty(k, v, stats=policy.stats)
        state.append(k, v, pos)
        held = int(state.n_valid()[0, 0])
        state.observe(to_slots(state, attn_fn(attn_seed + step, k.shape[2], held, k.shape[0])))
        policy.compress(state)
    return state


# --- slow, obviously-correct reference: plain lists, loops over b and h ---------------------------
def reference(method, budget, sinks, recent, blocks, attn_seed, seed=0, merge_num=16, attn_fn=causal_attn):
    """The paper's loop on plain lists; random draws are the policies' keyed ``uniform`` (layer 0, row = b)."""
    batch = blocks[0][0].shape[0]
    G = HQ // H
    cache = [[[] for _ in range(H)] for _ in range(batch)]
    total = 0
    for step, (k, v, pos) in enumerate(blocks):
        q = k.shape[2]
        total += q
        for b in range(batch):
            for h in range(H):
                for t in range(q):
                    cache[b][h].append(
                        {"k": k[b, h, t], "v": v[b, h, t].double(), "pos": int(pos[t]),
                         "acc": 0.0, "cnt": 0.0, "last": 0.0}
                    )
        L = len(cache[0][0])
        attn = attn_fn(attn_seed + step, q, L, batch)
        for b in range(batch):
            for h in range(H):
                for l, slot in enumerate(cache[b][h]):
                    means = [sum(float(attn[b, h * G + g, t, l]) for g in range(G)) / G for t in range(q)]
                    slot["acc"] += sum(means)
                    slot["cnt"] += sum(1 for t in range(q) if l <= L - q + t)
                    slot["last"] = means[-1]
        while len(cache[0][0]) > budget:
            L = len(cache[0][0])
            cand = range(sinks, L - max(recent, 1))
            if method == "cam":
                p = torch.zeros(batch, H)
                for b in range(batch):
                    for h in range(H):
                        S, j = cache[b][h], sinks
                        targets = range(j + 1, min(j + 1 + merge_num, L))
                        mean = sum(S[t]["acc"] for t in targets) / len(targets)
                        p[b, h] = 0.0 if S[j]["acc"] == 0 else (1.0 if mean == 0 else min(S[j]["acc"] / mean, 1.0))
            for b in range(batch):
                if method == "tova":
                    shared = min(cand, key=lambda i: sum(cache[b][h][i]["last"] for h in range(H)) / H)
                for h in range(H):
                    S = cache[b][h]
                    avg = [s["acc"] / max(s["cnt"], 1.0) for s in S]
                    if method in ("streaming_llm", "cam"):
                        j = sinks
                    elif method == "h2o":
                        j = min(cand, key=lambda i: S[i]["acc"])
                    elif method == "tova":
                        j = shared
                    elif method in ("weightedkv", "weightedkv_evict"):
                        j = min(cand, key=lambda i: avg[i])
                    elif method == "random":  # one draw per slot per compression call (step = tokens seen)
                        j = min(cand, key=lambda i: float(uniform(seed, b, 0, h, total, S[i]["pos"])))
                    if method == "weightedkv" and avg[j] + avg[j + 1] > 0:
                        S[j + 1]["v"] = (avg[j] * S[j]["v"] + avg[j + 1] * S[j + 1]["v"]) / (avg[j] + avg[j + 1])
                    if method == "cam" and float(uniform(seed, b, 0, h, S[j]["pos"])) < float(p[b, h]):
                        for t in range(j + 1, min(j + 1 + merge_num, L)):
                            S[t]["v"] = S[t]["v"] + S[j]["v"] / merge_num
                    del S[j]
    return cache


def assert_matches(state: LayerState, cache) -> None:
    state = state.ordered()  # slots sorted by position, free ones dropped: the reference's list order

    def stack(field):
        return torch.stack([torch.stack([torch.stack([torch.as_tensor(s[field]) for s in S]) for S in row])
                            for row in cache])

    assert state.positions.tolist() == stack("pos").tolist()
    torch.testing.assert_close(state.keys, stack("k"), rtol=0, atol=0)
    torch.testing.assert_close(state.values.double(), stack("v"), rtol=1e-5, atol=1e-5)
    # only the statistics the policy reads are kept; the others are never accumulated
    for name, field, tol in (("acc", "acc", 1e-6), ("count", "cnt", 0), ("last", "last", 1e-6)):
        expected = stack(field).double() if name in state.stats else torch.zeros_like(state.acc, dtype=torch.float64)
        torch.testing.assert_close(getattr(state, name).double(), expected, rtol=tol and 1e-5, atol=tol)


# --- Fig. 3 toy example -------------------------------------------------------------------------
FIG3 = [[1.0], [0.8, 0.5], [0.5, 0.3, 0.9], [0.4, 0.2, 0.7, 0.6], [0.3, 0.1, 0.5, 0.3, 0.5],
        [0.3, 0.4, 0.2, 0.3, 0.9], [0.3, 0.4, 0.2, 0.5, 0.7], [0.2, 0.4, 0.3, 0.4, 0.6]]  # fmt: skip


def by_position(state: LayerState, values) -> torch.Tensor:
    """(1, 1, C) statistics from one value per held token listed oldest first (free slots get 0)."""
    out = torch.zeros(state.positions.shape)
    order = torch.where(state.valid, state.positions, 10**9).argsort(-1)[..., : len(values)]
    return out.scatter(2, order, torch.tensor(values, dtype=torch.float32)[None, None])


def test_fig3_toy_example_replayed_exactly():
    # Step 5's illegible order: v2 = .1 and v3 = .5 are fixed by the text; v1, v4, v5 take .3, .3, .5
    # (only v2's unique minimum and v2/v3's weights matter, so any such order replays the same).
    policy = WeightedKV(budget=4, sinks=0, recent=0)
    eye = torch.eye(8)  # value of token i is the one-hot e_i: a final value reads off its mixture
    keys = torch.randn(1, 1, 8, 5, generator=torch.Generator().manual_seed(3))
    state = LayerState.empty(keys, eye[None, None])
    for step, avg in enumerate(FIG3, start=1):
        state.append(keys[:, :, step - 1 : step], eye[None, None, step - 1 : step], torch.tensor([step - 1]))
        # Real counts (slot at 0-based position p was seen step - p times) and acc = avg * count, so a
        # method scoring or weighting by the raw sum a instead of a / n would not replay the figure.
        held = state.ordered().positions[0, 0]
        count = (step - held).float().tolist()
        state.count = by_position(state, count)
        state.acc = by_position(state, [a * n for a, n in zip(avg, count)])
        policy.compress(state)
        if step == 5:
            torch.testing.assert_close(state.ordered().values[0, 0, 1], eye[1] / 6 + 5 * eye[2] / 6)
    final = state.ordered()
    assert final.positions[0, 0].tolist() == [2, 5, 6, 7]
    expected = torch.stack([eye[0] / 3 + eye[1] / 9 + 5 * eye[2] / 9,
                            4 / 35 * eye[3] + 6 / 35 * eye[4] + 5 / 7 * eye[5], eye[6], eye[7]])
    torch.testing.assert_close(final.values[0, 0], expected, rtol=0, atol=1e-6)
    assert torch.equal(final.keys[0, 0], keys[0, 0, [2, 5, 6, 7]])
    assert state.capacity == 5  # fixed capacity: budget + the one incoming token, reused in place


# --- each method against the loop reference -----------------------------------------------------
CONFIGS = [  # budget, sinks, recent, block sizes (prefill over budget, decode, a 3-token block, decode)
    (8, 2, 2, [12, 1, 1, 1, 3, 1, 1, 1, 1, 1]),
    (6, 1, 0, [9, 1, 1, 2, 1, 1, 1, 1]),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["s2r2", "s1r0"])
@pytest.mark.parametrize("method", SCORED)
def test_matches_loop_reference(method, config):
    budget, sinks, recent, sizes = config
    blocks = chunks(10, sizes)
    state = run(make_policy(method, budget, sinks=sinks, recent=recent, seed=5), blocks, attn_seed=100)
    assert state.ordered().capacity == budget
    assert_matches(state, reference(method, budget, sinks, recent, blocks, 100, seed=5))


def test_cam_clipped_short_merge_range_matches_reference():
    blocks = chunks(11, [12, 1, 1, 2, 1, 1, 1])
    state = run(CaM(budget=8, sinks=2, recent=3, merge_num=3, seed=9), blocks, attn_seed=200)
    assert_matches(state, reference("cam", 8, 2, 3, blocks, 200, seed=9, merge_num=3))


def test_full_keeps_everything():
    blocks = chunks(12, [7, 1, 1])
    for budget in (None, 3):
        state = run(make_policy("full", budget), blocks, attn_seed=0)
        assert state.ordered().positions[0, 0].tolist() == list(range(9))
        assert_matches(state, reference("full", 10**9, 0, 0, blocks, 0))


# --- CaM and random: the properties behind the shared draws -------------------------------------
def cam_state(acc_victim: float, acc_targets: float, L: int = 10, batch: int = 2, heads: int = 64) -> LayerState:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(batch, heads, L, D, generator=gen)
    state = LayerState.empty(keys, keys)
    state.append(keys, torch.randn(batch, heads, L, D, generator=gen), torch.arange(L))
    state.acc = torch.full((batch, heads, L), acc_targets)
    state.acc[:, :, 1] = acc_victim
    state.count = torch.ones(batch, heads, L)
    return state


def test_cam_forced_gate_adds_victim_value_over_next_merge_num():
    state = cam_state(acc_victim=5.0, acc_targets=1.0, L=10)  # p = 5 >= 1: always merged
    before = state.values.clone()
    CaM(budget=9, sinks=1, recent=2, merge_num=4).compress(state)  # victim: slot 1
    expected = torch.cat([before[:, :, :1], before[:, :, 2:]], dim=2)
    expected[:, :, 1:5] += before[:, :, 1:2] / 4  # targets: old slots 2..5
    torch.testing.assert_close(state.ordered().values, expected, rtol=0, atol=1e-6)
    assert state.ordered().positions[0, 0].tolist() == [0, 2, 3, 4, 5, 6, 7, 8, 9]


def test_cam_clips_range_but_keeps_divisor_and_handles_zero_means():
    state = cam_state(acc_victim=2.0, acc_targets=0.0, L=5)  # mean 0 -> p = inf -> clamped to 1
    before = state.values.clone()
    CaM(budget=4, sinks=1, recent=0, merge_num=16).compress(state)
    expected = torch.cat([before[:, :, :1], before[:, :, 2:]], dim=2)
    expected[:, :, 1:] += before[:, :, 1:2] / 16  # only 3 targets left, still divided by 16
    torch.testing.assert_close(state.ordered().values, expected, rtol=0, atol=1e-6)
    state = cam_state(acc_victim=0.0, acc_targets=0.0, L=5)  # 0 / 0 -> NaN -> p = 0: no merge
    before = state.values.clone()
    CaM(budget=4, sinks=1, recent=0).compress(state)
    assert torch.equal(state.ordered().values, torch.cat([before[:, :, :1], before[:, :, 2:]], dim=2))


def test_cam_gate_is_random_per_head_and_reproducible():
    def merged_mask(seed):
        state = cam_state(acc_victim=0.5, acc_targets=1.0)  # p = 0.5
        before = state.values.clone()
        CaM(budget=9, sinks=1, recent=2, seed=seed).compress(state)
        return (state.ordered().values[:, :, 1] != before[:, :, 2]).any(-1)  # (B, H): gate drawn 1

    a = merged_mask(1)
    assert 0.25 < a.float().mean() < 0.75
    assert torch.equal(a, merged_mask(1))
    assert not torch.equal(a, merged_mask(2))


def test_random_is_reproducible_and_seed_dependent():
    blocks = chunks(13, [30, 1, 1])
    kept = [run(make_policy("random", 10, sinks=2, recent=2, seed=s), blocks, 0).ordered().positions for s in (1, 1, 2)]
    assert torch.equal(kept[0], kept[1])
    assert not torch.equal(kept[0], kept[2])
    assert not torch.equal(kept[0][:, 0], kept[0][:, 1])  # heads decide independently


# --- invariants ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", SCORED)
def test_budget_sinks_and_recent_window_hold_every_step(method):
    budget, sinks, recent = 10, 3, 4
    policy = make_policy(method, budget, sinks=sinks, recent=recent, seed=1)
    blocks = chunks(14, [15] + [1] * 12 + [4] + [1] * 5)
    state, total = None, 0
    for step, (k, v, pos) in enumerate(blocks):
        state = state or LayerState.empty(k, v)
        state.append(k, v, pos)
        state.observe(to_slots(state, causal_attn(300 + step, k.shape[2], int(state.n_valid()[0, 0]))))
        policy.compress(state)
        total += k.shape[2]
        held = state.ordered()
        assert held.capacity == min(total, budget)
        assert (held.positions[..., :sinks] == torch.arange(sinks)).all()
        assert (held.positions[..., -recent:] == torch.arange(total - recent, total)).all()
        assert state.capacity <= max(15, budget + 4)  # slots are reused, not appended


@pytest.mark.parametrize("method", SCORED)
def test_batch_rows_do_not_leak(method):
    blocks = chunks(15, [12, 1, 1, 2, 1, 1])
    other = chunks(16, [12, 1, 1, 2, 1, 1])
    mixed = [(torch.cat([k[:1], k2[1:]]), torch.cat([v[:1], v2[1:]]), p)
             for (k, v, p), (k2, v2, _) in zip(blocks, other)]

    def attn_changed(seed, q, L, batch):
        a = causal_attn(seed, q, L, batch)
        return torch.cat([a[:1], causal_attn(seed + 999, q, L, batch)[1:]])

    a = run(make_policy(method, 8, sinks=2, recent=2), blocks, 400)
    b = run(make_policy(method, 8, sinks=2, recent=2), mixed, 400, attn_fn=attn_changed)
    assert not torch.equal(a.values[1], b.values[1])  # row 1 really changed
    for field in ("keys", "values", "positions", "acc", "count", "last"):
        assert torch.equal(getattr(a, field)[0], getattr(b, field)[0]), field


@pytest.mark.parametrize("method", SCORED)
def test_long_prefill_compresses_to_budget_like_single_steps(method):
    budget, sinks, recent = 16, 2, 3
    L = budget + 50
    keys = torch.randn(B, H, L, D, generator=torch.Generator().manual_seed(17))
    values = torch.eye(L).expand(B, H, L, L).clone()  # one-hot: a value row reads off its mixture
    states = []
    for _ in range(2):
        state = LayerState.empty(keys, values)
        state.append(keys, values, torch.arange(L))
        state.observe(causal_attn(500, L, L))
        states.append(state)
    # one pass (victims ranked once, evictions freed together) against one single-victim step at a time
    make_policy(method, budget, sinks=sinks, recent=recent, seed=3).compress(states[0])
    stepwise = make_policy(method, budget, sinks=sinks, recent=recent, seed=3)
    for size in range(L - 1, budget - 1, -1):
        stepwise.budget = size
        states[1].pending = 1  # as if one token had just arrived: the single-victim path
        stepwise.compress(states[1])
        assert states[1].ordered().capacity == size
    assert states[0].ordered().capacity == budget
    for field in ("keys", "values", "positions", "acc", "count", "last"):
        assert torch.equal(getattr(states[0], field), getattr(states[1], field)), field
    if method == "weightedkv":
        values = states[0].ordered().values
        mixed = (values > 0).sum(-1)  # (B, H, budget): original tokens per slot
        assert mixed.max() >= 3  # some merged slot was merged again: merges cascaded
        torch.testing.assert_close(values.sum(-1), torch.ones(B, H, budget))  # convex


# --- WeightedKV merge details -------------------------------------------------------------------
def test_weightedkv_merge_in_float32_keeps_dtype_and_guards_zero():
    gen = torch.Generator().manual_seed(18)
    keys = torch.randn(1, 2, 6, D, generator=gen).bfloat16()
    values = torch.randn(1, 2, 6, D, generator=gen).bfloat16()
    state = LayerState.empty(keys, values)
    state.append(keys, values, torch.arange(6))
    state.acc = torch.tensor([[[9, 0.3, 0.7, 5, 5, 5], [9, 0.0, 0.0, 5, 5, 5]]])
    state.count = torch.tensor([[[6, 3.0, 1.0, 3, 2, 1], [6, 5.0, 4.0, 3, 2, 1]]])
    WeightedKV(budget=5, sinks=1, recent=2).compress(state)
    state = state.ordered()
    assert state.values.dtype == torch.bfloat16
    w = torch.tensor([0.1, 0.7])  # head 0: averages 0.3/3 and 0.7/1
    expected = ((w[0] * values[0, 0, 1].float() + w[1] * values[0, 0, 2].float()) / w.sum()).bfloat16()
    assert torch.equal(state.values[0, 0, 1], expected)
    assert torch.equal(state.values[0, 1, 1], values[0, 1, 2])  # head 1: 0 + 0 -> neighbour kept
    assert state.positions[0].tolist() == [[0, 2, 3, 4, 5]] * 2
    assert state.acc[0, 0, 1] == 0.7 and state.count[0, 0, 1] == 1.0  # neighbour's stats untouched


# --- LayerState.observe -------------------------------------------------------------------------
def test_observe_multi_token_block():
    k, v, pos = chunks(19, [4])[0]
    state = LayerState.empty(k, v)
    state.append(k, v, pos)
    state.observe(causal_attn(20, 4, 4))
    k, v, pos = chunks(21, [5])[0]
    state.append(k, v, pos + 4)
    attn = causal_attn(22, 5, 9)
    attn[:, :, :, 0] = 0.0  # a weight of exactly 0 still counts as "seen"
    state.observe(attn)
    grouped = attn.view(B, H, 2, 5, 9).mean(2)  # (B, H, q, L)
    acc = torch.zeros(B, H, 9)
    for t in range(5):
        acc += grouped[:, :, t]
    prior = causal_attn(20, 4, 4).view(B, H, 2, 4, 4).mean(2).sum(2)
    acc[..., :4] += prior
    torch.testing.assert_close(state.acc, acc)
    # prefill counts are causal [4, 3, 2, 1]; the 5 new queries see all old slots, new slot t: 5 - t
    assert (state.count == torch.tensor([9.0, 8, 7, 6, 5, 4, 3, 2, 1])).all()
    torch.testing.assert_close(state.last, grouped[:, :, -1])


# --- bad input ----------------------------------------------------------------------------------
def test_registry_order_and_names():
    assert list(METHODS) == ["full", "streaming_llm", "h2o", "tova", "cam", "weightedkv", "weightedkv_evict", "random"]
    seeded = {"cam", "random"}
    for name, cls in METHODS.items():
        policy = make_policy(name, 64, seed=7)
        assert type(policy) is cls and policy.name == name
        assert (getattr(policy, "seed", None) == 7) == (name in seeded)  # the seed reaches exactly these


def test_unknown_method_lists_valid_ones():
    with pytest.raises(UserError) as err:
        make_policy("snapkv", 64)
    message = str(err.value)
    assert "\n" not in message and "snapkv" in message
    assert all(name in message for name in METHODS)


@pytest.mark.parametrize("method", SCORED)
def test_budget_must_exceed_sinks_plus_recent(method):
    with pytest.raises(UserError):
        make_policy(method, 8, sinks=4, recent=4)
    with pytest.raises(UserError):
        make_policy(method, 4, sinks=4, recent=0)
    assert make_policy(method, 9, sinks=4, recent=4).recent == 4
