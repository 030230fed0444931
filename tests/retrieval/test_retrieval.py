"""Retrieval under compression (analysis/retrieval, experiments/retrieval.py): prompts, decode paths, scores, fates.

Prompts are checked with a word-level stand-in tokenizer (exact positions by hand); the decode paths
on a tiny random llama with hand-made prompts; the real model only for the harness sanity check,
the command's end-to-end run and the bad inputs that need it (marked slow).
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import torch

from analysis.compress import PolicyOptions, eviction_ablation
from analysis.errors import UserError
from analysis.jobs.job import Job
from analysis.retrieval import run as retrieval_run
from analysis.retrieval.grid import build_prompts, check_positions, retrieval_settings
from analysis.retrieval.run import Unit, run_batch, run_units, token_fates
from analysis.retrieval.summary import by_fate, cells, paired, wilson
from analysis.retrieval.tasks import (
    NEEDLE_TASK,
    NEEDLES,
    Prompt,
    haystacks,
    insertion_point,
    needle_prompt,
    passkey_prompt,
    sentence_starts,
)
from analysis.runtime.batching import Batching
from analysis.runtime.cache import CompressedCache, Rows
from analysis.runtime.decode import decode_into, decode_rows, default_chunk
from analysis.stats import sign_test
from analysis.text.corpora import Document
from experiments.common import run_main
from experiments.retrieval import main


class WordTokenizer:
    """One id per word with its leading whitespace: positions in a prompt can be checked by eye."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = []
        for word in re.findall(r"\s*\S+|\s+", text):
            if word not in self.vocab:
                self.vocab[word] = len(self.words)
                self.words.append(word)
            out.append(self.vocab[word])
        return out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(self.words[i] for i in ids)

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


HAYSTACK = " ".join(f"Sentence number {k} says little." if k % 3 else f"Mrs. Smith spoke {k} times."
                    for k in range(60))


# --- prompts -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 25, 50, 90, 100])
def test_needle_goes_back_to_a_sentence_boundary_at_the_depth(depth):
    tok = WordTokenizer()
    hay = ("doc", tok.encode(HAYSTACK))
    p = needle_prompt(tok, hay, 120, depth, trial=3, seed=1)
    assert len(p.ids) == 120
    start, stop = p.needle
    fact = next(f for f in NEEDLES if tok.decode(p.ids[start:stop]).strip() == f"{f.cloze} {f.answer}.")
    head = len(tok.encode(NEEDLE_TASK))
    context = p.question - head - (stop - start)  # haystack tokens in the prompt
    before = start - head  # haystack tokens before the needle
    target = round(context * depth / 100)
    assert before <= target
    if before:  # the token before the needle ends a sentence, and no sentence starts between it and the target
        assert tok.decode([p.ids[start - 1]]).endswith(".")
        assert not tok.decode([p.ids[start - 2]]).endswith("Mrs")
        between = tok.decode(p.ids[start:start]).strip()  # nothing in between by construction
        assert between == ""
        gap = tok.decode(hay[1][before:target])
        assert not re.search(r"(?<!Mrs)\. ", gap), gap
    assert tok.decode([p.ids[i] for i in p.tracked]).strip() == fact.answer
    assert tok.decode(p.answer) == " " + fact.answer
    assert tok.decode(p.ids[p.question:]).endswith(f"Answer: {fact.cloze}")


def test_sentence_starts_skip_abbreviations():
    tok = WordTokenizer()
    ids = tok.encode("One thing. Mrs. Smith came. Then")
    # One | thing. | Mrs. | Smith | came. | Then: sentences start after "thing." and "came.", not "Mrs."
    assert sentence_starts(tok, ids) == [0, 2, 5]
    assert insertion_point([0, 2, 5], 6, 50) == 2  # 50 % of 6 is token 3: back to the start at 2
    assert insertion_point([0, 2, 5], 6, 100) == 5  # the text ends mid-sentence: not a start


def test_passkey_prompt_has_the_length_and_the_key_twice():
    tok = WordTokenizer()
    p = passkey_prompt(tok, 200, 50, trial=0, seed=0)
    text = tok.decode(p.ids)
    key = p.answer_text
    assert len(p.ids) == 200 and re.fullmatch(r"\d{5}", key)
    assert text.count(f"The pass key is {key}. Remember it. {key} is the pass key.") == 1
    assert [tok.decode([p.ids[i]]).strip() for i in p.tracked] == [key, key]
    assert text.endswith("What is the pass key? The pass key is")


def test_grids_are_reproducible_from_the_seed():
    tok = WordTokenizer()
    s = retrieval_settings("passkey", lengths="150,200", depths="0,50", budget="32", methods="weightedkv", trials=3)
    again = build_prompts(tok, s)
    assert build_prompts(tok, s) == again
    other = build_prompts(tok, retrieval_settings("passkey", lengths="150,200", depths="0,50", budget="32",
                                                  methods="weightedkv", trials=3, seed=1))
    assert [p.answer_text for p in other] != [p.answer_text for p in again]
    # a trial's key is the same at every depth: depths are compared paired
    assert len({p.answer_text for p in again if p.length == 150 and p.trial == 0}) == 1


def test_haystack_shorter_than_the_length_is_refused():
    tok = WordTokenizer()
    with pytest.raises(UserError, match="--lengths 500: the haystack text is too short"):
        haystacks(tok, [Document("short", "text", "Only a few words here.")], 500, 2)


def test_wilson_interval_hand_worked():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38416 = 0.71683, half 0.20991
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    # 0 of 5: [0, (z²/n) / (1 + z²/n)] = [0, 0.76829 / 1.76829]
    assert wilson(0, 5) == pytest.approx((0.0, 0.43448), abs=1e-5)
    assert wilson(5, 5) == pytest.approx((1 - 0.43448, 1.0), abs=1e-5)


# --- decode paths on a tiny model ----------------------------------------------------------------------
L, A = 48, 3


def tiny_prompt(trial: int, depth: int = 40, length: int = L) -> Prompt:
    gen = torch.Generator().manual_seed(trial)
    ids = torch.randint(1, 101, (length + A,), generator=gen).tolist()
    at = round((length - 8) * depth / 100)
    return Prompt("passkey", length, depth, trial, tuple(ids[:length]), tuple(ids[length:]), "x",
                  (at, at + 1, at + 2), (at, at + 3), length - 4, "random")


def test_decode_mode_is_the_perplexity_evaluators_path(tiny_model):
    model = tiny_model("llama")
    job = Job.of("weightedkv", 16, PolicyOptions(sinks=2))
    units = [Unit(job, tiny_prompt(t)) for t in range(3)]
    held = {}
    records = run_batch(model, units, "decode", on_prompt=lambda cache, _: held.update(
        {i: cache.kept_positions(i).clone() for i in range(len(cache.layers))}))
    ids = torch.tensor([list(u.prompt.ids) + list(u.prompt.answer) for u in units])  # (3, L + A)
    rows = Rows(ids=torch.tensor([u.row_id for u in units]))
    with torch.inference_mode(), CompressedCache(model, job.policy, rows=rows) as cache:
        decode_into(model, ids[:, : L + 1], cache, job.uncompressed(L + 1), default_chunk(3))  # all L prompt tokens
        for i in range(len(cache.layers)):
            assert torch.equal(cache.kept_positions(i), held[i])
    nll = decode_rows(model, ids, job.policy, job.uncompressed(L + A), window_ids=[u.row_id for u in units])
    for r, row in zip(records, nll):
        assert r["answer_logprob"] == pytest.approx(-float(row[L - 1 :].double().sum()), abs=1e-4)


def test_full_logprob_equals_a_plain_forward_pass(tiny_model):
    model = tiny_model("llama")
    units = [Unit(Job.of("full"), tiny_prompt(t)) for t in range(2)]
    for mode in ("decode", "prefill"):
        records = run_batch(model, units, mode)
        ids = torch.tensor([list(u.prompt.ids) + list(u.prompt.answer) for u in units])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits.float(), -1)  # (2, L + A, V)
        for i, r in enumerate(records):
            exact = logp[i, L - 1 : L + A - 1].gather(-1, ids[i, L:, None]).sum()
            assert r["answer_logprob"] == pytest.approx(float(exact), abs=1e-4)
            greedy = logp[i, L - 1 : L + A - 1].argmax(-1)  # teacher-forced argmax == the answer <=> greedy says it
            assert r["correct"] == bool((greedy == ids[i, L:]).all())
            assert r["fate_kept"] == 1.0


def test_fates_sum_to_one_and_an_evicted_token_is_gone(tiny_model):
    model = tiny_model("llama")
    units = [Unit(Job.of(m, 12, PolicyOptions(sinks=2)), tiny_prompt(t, depth=20)) for m in
             ("weightedkv", "weightedkv_evict") for t in range(2)]
    seen = {}

    def look(cache, tracked):
        seen["fates"] = token_fates(cache, tracked)
        seen["held"] = [(cache.kept_positions(i)[..., None] == tracked[:, None, None, :]).any(2)
                        for i in range(len(cache.layers))]  # (b, H, T) per layer: own slot held

    run_batch(model, units, "decode", on_prompt=look)
    f = seen["fates"]
    torch.testing.assert_close(f["kept"] + f["merged"] + f["gone"], torch.ones(4, 3))
    kept = torch.stack(seen["held"]).float().mean((0, 2))  # (b, T): fraction of (layer, head) holding it
    torch.testing.assert_close(f["kept"], kept)
    evict = slice(2, 4)
    assert (f["gone"][evict] > 0).any()  # the setting does evict the fact
    torch.testing.assert_close(f["gone"][evict], 1 - kept[evict])  # eviction: not held means gone
    assert (f["merged"][evict] == 0).all()
    torch.testing.assert_close(f["merged"][:2], 1 - kept[:2])  # merging: not held means merged somewhere


def test_rows_do_not_depend_on_the_batching(tiny_model, tmp_path, monkeypatch):
    model = tiny_model("llama")
    jobs = [Job.of(m, 16, PolicyOptions(sinks=2)) for m in ("cam", "random", "h2o")]
    units = [Unit(j, tiny_prompt(t, d)) for j in jobs for t in range(2) for d in (0, 60)]
    one = run_units(model, units, "decode", batching=Batching(batch_size=12))
    small = run_units(model, units, "decode", batching=Batching(batch_size=5, partial=tmp_path / "new"))
    for a, b in zip(one, small):
        assert a["unit"] == b["unit"]
        assert a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-4)
        assert (a["correct"], a["fate_kept"]) == (b["correct"], pytest.approx(b["fate_kept"], abs=1e-6))
    monkeypatch.setattr(retrieval_run, "run_batch", lambda *a, **k: pytest.fail("a finished unit was recomputed"))
    resumed = run_units(model, units, "decode", batching=Batching(batch_size=7, partial=tmp_path / "new"))
    assert resumed == small  # everything came from the partial directory


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding layers are fanned out too
def test_prefill_runs_one_forward_per_prompt_and_equals_each_row_alone(tiny_model, family):
    """Five methods x two prompts: the shared prefill feeds 2 rows, and every row's cache is what a plain
    prefill of its prompt through its own CompressedCache holds (compressed inside the forward)."""
    model = tiny_model(family)
    jobs = [Job.of(m, 12, PolicyOptions(sinks=2)) for m in ("h2o", "tova", "weightedkv", "cam", "random")]
    units = [Unit(j, tiny_prompt(t)) for j in jobs for t in range(2)]
    fed, held = [], {}
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[0]))
    try:
        records = run_batch(model, units, "prefill", on_prompt=lambda cache, _: held.update(
            {i: (cache.kept_positions(i).clone(), layer.state.ordered().values.clone())
             for i, layer in enumerate(cache.layers) if getattr(layer, "state", None) is not None}))
    finally:
        hook.remove()
    assert fed[0] == 2 and fed[1:] == [10] * (len(fed) - 1)  # one prefill row per prompt, then every row
    for r, u in enumerate(units):
        ids, row = torch.tensor([u.prompt.ids]), Rows(ids=torch.tensor([u.row_id]))  # (1, L): the prompt alone
        with torch.inference_mode(), CompressedCache(model, u.job.policy, rows=row) as cache:
            logits = model(ids, past_key_values=cache, use_cache=True).logits[0, -1]  # (V,)
            for i in range(len(cache.layers)):
                if i in held:  # a compressed layer (a sliding one holds the model's own cache)
                    assert torch.equal(cache.kept_positions(i)[0], held[i][0][r]), (u.key, i)
                    torch.testing.assert_close(cache.layers[i].state.ordered().values[0], held[i][1][r], rtol=0,
                                               atol=1e-5)
            logprob, answer = 0.0, u.prompt.answer
            for k, token in enumerate(answer):  # the answer teacher-forced, one token per step
                logprob += float(torch.log_softmax(logits.float(), -1)[token])
                if k + 1 < len(answer):
                    logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                                   position_ids=torch.tensor([[L + k]])).logits[0, -1]
        assert records[r]["answer_logprob"] == pytest.approx(logprob, abs=1e-4), u.key
    assert [r["unit"] for r in records] == [u.key for u in units]


def test_prefill_batches_keep_a_prompts_methods_together():
    jobs = [Job.of(m, 12, PolicyOptions(sinks=2)) for m in ("h2o", "tova", "weightedkv")]
    units = [Unit(j, tiny_prompt(t, d)) for j in jobs for t in range(3) for d in (0, 50)]
    batches = retrieval_run.pack(units, batch_size=7, rows_for=lambda length: 4)
    assert [len(b) for b in batches] == [6, 6, 6]  # 7 // 3 = 2 prompts of 3 jobs per batch
    for batch in batches:
        prompts = {(u.prompt.depth, u.prompt.trial) for u in batch}
        assert len(prompts) == 2 and all(sum((u.prompt.depth, u.prompt.trial) == p for u in batch) == 3
                                         for p in prompts)
    assert len(retrieval_run.pack(units, batch_size=64, rows_for=lambda length: 4)) == 2  # 4 prompts, then 2


def test_protected_question_is_never_compressed(tiny_model):
    model = tiny_model("llama")
    job = Job.of("h2o", 12, PolicyOptions(sinks=2))
    held = {}
    for mode in ("decode", "prefill"):
        run_batch(model, [Unit(job, tiny_prompt(0))], mode, protect_from=L - 4,
                  on_prompt=lambda cache, _: held.update(kept=cache.kept_positions(0)[0, 0].tolist()))
        assert set(range(L - 4, L)) <= set(held["kept"])  # the question's 4 tokens
        assert len([p for p in held["kept"] if p >= 0]) == 12 + 4  # the budget, then the question on top


def test_paired_merge_against_its_eviction_by_hand():
    def trial(method, t, logp, correct, budget=64):
        return {"method": method, "budget": budget, "length": 100, "depth": 50, "trial": t,
                "answer_logprob": logp, "correct": correct}

    records = [trial("weightedkv", 0, -1.0, True), trial("weightedkv_evict", 0, -2.0, False),
               trial("weightedkv", 1, -3.0, False), trial("weightedkv_evict", 1, -1.0, True),
               trial("weightedkv", 2, -5.0, False), trial("weightedkv_evict", 2, -4.0, False),
               trial("weightedkv", 3, -1.0, True), trial("weightedkv_evict", 3, -1.0, True),
               trial("weightedkv", 0, -1.0, True, budget=128)]  # no eviction at 128: no pair
    [row] = paired(records, {"weightedkv": "weightedkv_evict", "cam": "streaming_llm"})
    assert row["pairs"] == 4 and (row["merge_higher"], row["merge_lower"]) == (1, 2)  # a tie on trial 3
    assert row["p_value"] == pytest.approx(1.0)  # 1 of 3 untied: as likely as not
    assert row["mean_diff"] == pytest.approx((1 - 2 - 1 + 0) / 4)
    assert (row["both_right"], row["merge_only"], row["evict_only"], row["neither"]) == (1, 1, 1, 1)
    assert sign_test(8, 0) == pytest.approx(2 / 2**8) and sign_test(0, 0) == 1.0
    assert eviction_ablation("cam") == "streaming_llm" and eviction_ablation("keepkv_like") == "weightedkv_evict"
    assert eviction_ablation("h2o") is None


def test_cells_and_fate_table():
    base = {"method": "weightedkv", "budget": 64, "length": 100, "depth": 0, "fate_merged": 0.0,
            "merged_weight": 0.0}
    records = [dict(base, correct=c, answer_logprob=lp, fate_kept=k, fate_gone=1 - k)
               for c, lp, k in ((True, -1.0, 1.0), (False, -3.0, 0.0), (True, -2.0, 0.6))]
    (row,) = cells(records, "passkey", "decode")
    assert (row["trials"], row["correct"], row["answer_logprob"]) == (3, 2, -2.0)
    assert row["fates"]["kept"] == pytest.approx(1.6 / 3, abs=1e-5)
    table = {(r["by"], r["group"]): r for r in by_fate(records)}
    assert table["fate", "kept"]["correct"] == 2 and table["fate", "gone"]["trials"] == 1
    assert table["keys kept", "none"]["correct"] == 0


# --- the command -----------------------------------------------------------------------------------------
def fails(argv, capsys, tmp_path, match: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        run_main(main, argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,match", [
    (["passkey", "--depths", "0,150"], "0 to 100; got 150"),
    (["passkey", "--budget", "16", "--recent", "12"], "must exceed sinks \\+ recent"),
    (["haystack"], "invalid choice: 'haystack'"),
    (["passkey", "--mode", "stream"], "invalid choice: 'stream'"),
])
def test_bad_inputs_fail_before_the_model_loads(argv, match, capsys, tmp_path):
    fails(argv, capsys, tmp_path, match)


def test_resume_with_other_settings_is_refused(capsys, tmp_path):
    partial = tmp_path / ".out.partial"
    partial.mkdir()
    (partial / "settings.json").write_text(json.dumps({"task": "passkey", "trials": 99}))
    fails(["passkey", "--lengths", "256"], capsys, tmp_path, "unfinished run with other settings")


def test_context_longer_than_the_positions_says_the_limit():
    s = retrieval_settings("passkey", lengths="8190", budget="64", methods="weightedkv", trials=1)
    with pytest.raises(UserError, match="exceed the model's 8192 positions"):
        check_positions(s, 8192)


@pytest.mark.slow
def test_full_answers_a_short_passkey(embedded):
    units = [Unit(Job.of("full"), passkey_prompt(embedded.tokenizer, 220, d, trial=0)) for d in (30, 70)]
    records = run_batch(embedded.model, units, "decode", greedy=6)
    assert all(r["correct"] for r in records), records
    assert embedded.tokenizer.decode(records[0]["greedy"]).strip().startswith(units[0].prompt.answer_text)


@pytest.mark.slow
def test_command_writes_the_contract(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.retrieval", "needle", "--lengths", "200", "--depths", "50",
           "--budget", "64", "--methods", "full,weightedkv,weightedkv_evict", "--trials", "1", "--no-png", "--quiet"]
    subprocess.run(cmd + ["--out", str(out)], check=True, capture_output=True)
    rows = json.loads((out / "retrieval.json").read_text())["rows"]
    keys = {"task", "mode", "method", "budget", "length", "depth", "trials", "accuracy", "ci_low", "ci_high",
            "answer_logprob", "fates"}
    assert len(rows) == 3 and all(keys <= set(r) and set(r["fates"]) == {"kept", "merged", "gone"} for r in rows)
    with open(out / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    assert [t["method"] for t in trials] == ["full", "weightedkv", "weightedkv_evict"]
    assert (out / "retrieval.csv").is_file()
    with open(out / "paired.csv", newline="") as f:
        [pair] = list(csv.DictReader(f))  # the merge beside its own eviction, on the same trial
    assert (pair["method"], pair["evict"], pair["pairs"]) == ("weightedkv", "weightedkv_evict", "1")


@pytest.mark.slow
def test_command_refuses_a_short_haystack(capsys, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short text. It has two sentences.")
    argv = ["needle", "--text", str(short), "--lengths", "200", "--methods", "full", "--trials", "1", "--quiet"]
    fails(argv, capsys, tmp_path, "haystack text is too short")


def test_tracked_mixing_is_the_full_records_columns(tiny_model, random_ids):
    """``track_mixing`` given positions (b, T) records exactly those columns of the full (all-position) record."""
    model = tiny_model("llama")
    ids = random_ids(2, 40, seed=3)
    tracked = torch.tensor([[3, 10, 11], [5, 6, 30]])
    states = []
    for track in (40, tracked):
        with torch.inference_mode(), CompressedCache(model, "weightedkv", 12, sinks=2, track_mixing=track) as cache:
            decode_into(model, ids, cache, 12, 12)
            states.append(cache.layers[1].state)
    full, mine = states
    assert mine.mixing.shape[-1] == 3 and torch.equal(full.positions, mine.positions)
    torch.testing.assert_close(mine.mixing, full.mixing.gather(3, tracked[:, None, None, :].expand(2, 2, 13, 3)))
