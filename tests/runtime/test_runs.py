"""analysis.runtime.runs (save/load, atomic output, refusing to clobber) and the ``experiments.capture`` command."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from analysis.errors import UserError
from analysis.io import atomic_dir, check_out_dir
from analysis.runtime.capture import Capture
from analysis.runtime.runs import META, TENSORS, list_runs, load_meta, load_run, save_run
from tests.conftest import REPO


def sample_capture(seed: int = 0) -> Capture:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "layers.0.key_post_rope": torch.randn(2, 3, 5, 4, generator=gen),
        "layers.0.value": torch.randn(2, 3, 5, 4, generator=gen).to(torch.bfloat16),
        "layers.0.attn_count": torch.arange(5, 0, -1).float().expand(2, 5),  # non-contiguous view
        "layers.2.query_post_rope": torch.randn(2, 6, 5, 4, generator=gen)[:, :, :, :3],  # strided
        "layers.2.special": torch.tensor([float("nan"), float("inf"), -0.0, 1e-45]),
    }
    meta = {"kind": "capture", "layers": [0, 2], "kinds": ["key_post_rope"], "tokens": 5,
            "text_ids": ["books/x", "é/ü"], "token_ids": [[1, 2, 3, 4, 5]] * 2, "maps_window": None,
            "config": {"num_layers": 3, "rope_theta": 10000.0}}
    return Capture(tensors, meta)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- save / load ------------------------------------------------------------------------------------
def test_save_load_round_trip_is_bit_identical(tmp_path):
    cap = sample_capture()
    out = save_run(cap, tmp_path / "run")
    assert out == tmp_path / "run" and sorted(p.name for p in out.iterdir()) == sorted([META, TENSORS])
    loaded = load_run(out)
    assert loaded.meta == cap.meta and load_meta(out) == cap.meta
    assert set(loaded.tensors) == set(cap.tensors)
    for key, t in cap.tensors.items():
        got = loaded.tensors[key]
        assert got.dtype == t.dtype and got.shape == t.shape, key
        # bit-identical, NaNs and signed zeros included
        assert torch.equal(got.contiguous().view(torch.uint8), t.contiguous().view(torch.uint8)), key
    assert loaded.layers == [0, 2] and leftovers(tmp_path) == []


def test_load_run_of_a_directory_that_is_not_a_run(tmp_path):
    (tmp_path / META).write_text("{}")
    with pytest.raises(UserError, match="not a capture run"):
        load_run(tmp_path)


# --- refusing to clobber, atomic output ----------------------------------------------------------------
def test_check_out_dir_refuses_an_existing_run_unless_overwrite(tmp_path):
    out = save_run(sample_capture(0), tmp_path / "run")
    with pytest.raises(UserError, match="already holds another run; pass --overwrite"):
        check_out_dir(out)
    with pytest.raises(UserError, match="already holds another run"):
        save_run(sample_capture(1), out)
    assert torch.equal(load_run(out).tensors["layers.0.key_post_rope"],
                       sample_capture(0).tensors["layers.0.key_post_rope"])  # untouched
    assert check_out_dir(out, overwrite=True) == out
    save_run(sample_capture(1), out, overwrite=True)
    assert torch.equal(load_run(out).tensors["layers.0.key_post_rope"],
                       sample_capture(1).tensors["layers.0.key_post_rope"])
    assert leftovers(tmp_path) == []


def test_check_out_dir_other_cases(tmp_path):
    assert check_out_dir(tmp_path / "new") == tmp_path / "new"  # absent: fine, not created
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="other files"):
        check_out_dir(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        check_out_dir(tmp_path / "file", overwrite=True)


def test_exception_inside_atomic_dir_leaves_nothing_behind(tmp_path):
    out = tmp_path / "sub" / "run"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 100)
            assert tmp.parent == out.parent and tmp.is_dir()
            raise RuntimeError("crash")
    assert not out.exists() and not tmp.exists()
    assert list(out.parent.iterdir()) == []


def test_exception_inside_atomic_dir_keeps_the_old_run(tmp_path):
    out = save_run(sample_capture(0), tmp_path / "run")
    before = (out / META).read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / META).write_text("{}")
            raise KeyboardInterrupt
    assert (out / META).read_bytes() == before and leftovers(tmp_path) == []


def test_list_runs_newest_first_and_only_runs(tmp_path):
    assert list_runs(tmp_path / "missing") == []
    a = save_run(sample_capture(0), tmp_path / "a")
    b = save_run(sample_capture(1), tmp_path / "b")
    os.utime(a, (time.time() - 100, time.time() - 100))
    (tmp_path / "notes").mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / META).write_text("{}")  # no tensors: not a run
    (tmp_path / "file.txt").write_text("x")
    assert list_runs(tmp_path) == [b, a]
    os.utime(a, (time.time() + 100, time.time() + 100))
    assert list_runs(str(tmp_path)) == [a, b]


# --- the command ---------------------------------------------------------------------------------------
def capture_cmd(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "experiments.capture", "--quiet", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_capture_command_writes_a_loadable_run(tmp_path):
    out = tmp_path / "runs" / "austen"
    proc = capture_cmd("--tokens", "64", "--layers", "0,1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote {out}: 1 x 64 tokens, layers [0, 1]"
    assert proc.stderr == ""  # --quiet: no progress bars, no warnings
    cap = load_run(out)
    assert cap.meta["model"] == "SmolLM2-135M-Instruct" and cap.meta["source"] == {"corpus": "books"}
    assert cap.layers == [0, 1] and cap.meta["tokens"] == 64 and len(cap.meta["token_ids"][0]) == 64
    assert cap.meta["text_ids"][0].startswith("books/")
    for i in (0, 1):
        assert cap.get(i, "key_pre_rope").shape == (1, 3, 64, 64)
        assert cap.get(i, "query_post_rope").shape == (1, 9, 64, 64)
        assert cap.get(i, "attn_received").shape == (1, 9, 64)
        assert all(torch.isfinite(t).all() for t in cap.tensors.values())
    assert list_runs(out.parent) == [out] and leftovers(out.parent) == []


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (extra arguments, regex the error message must match)."""
    (tmp / "no_config").mkdir()
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp / "t5").mkdir()
    (tmp / "t5" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("  \n\n ")
    (tmp / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp / "short.txt").write_text("It is a truth universally acknowledged.")
    existing = save_run(sample_capture(), tmp / "existing")
    return {
        "unknown_model": (["--model", "nobody/nonexistent-model"], "not in the local Hugging Face cache"),
        "no_config": (["--model", str(tmp / "no_config")], "not a Hugging Face model directory"),
        # bert is registered as a causal LM (BertLMHeadModel), so it fails on its missing weights
        "bert": (["--model", str(tmp / "bert")], "cannot load model .*bert.*no file named"),
        "t5": (["--model", str(tmp / "t5")], "is not a causal language model .*'t5'"),
        "missing_text": (["--text", str(tmp / "missing.txt")], "no such file"),
        "empty_text": (["--text", str(tmp / "empty.txt")], "the file is empty"),
        "blank_text": (["--text", str(tmp / "blank.txt")], "the file is empty"),
        "not_utf8": (["--text", str(tmp / "latin1.txt")], "not UTF-8 text \\(byte 0xe9 at offset 3\\)"),
        "too_many_tokens": (["--text", str(tmp / "short.txt")],
                            "--tokens 64 is more than the text provides: the longest document has \\d+ tokens"),
        "out_exists": (["--out", str(existing)], "already holds another run; pass --overwrite"),
        "bad_layers": (["--layers", "0,99"], "out of range: the model has layers 0-29"),
        "bad_kind": (["--kinds", "value,keys"], "unknown kind"),
    }


@pytest.mark.slow
def test_capture_command_bad_inputs(tmp_path):
    """Each: exit 2, one stderr line 'error: ...', and no run directory (or temp) left behind."""

    cases = _bad_inputs(tmp_path)
    existing_meta = (tmp_path / "existing" / META).read_bytes()

    def run(name):
        args, _ = cases[name]
        out = tmp_path / f"out_{name}"
        if "--out" not in args:
            args = [*args, "--out", str(out)]
        return name, out, capture_cmd("--tokens", "64", *args)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, cases))
    problems = []
    for name, out, proc in results:
        lines = proc.stderr.splitlines()
        if proc.returncode != 2 or len(lines) != 1 or not lines[0].startswith("error: "):
            problems.append(f"{name}: rc={proc.returncode} stderr={proc.stderr[-800:]!r}")
        elif not re.search(cases[name][1], lines[0]):
            problems.append(f"{name}: unexpected message {lines[0]!r}")
        if name != "out_exists" and out.exists():
            problems.append(f"{name}: left {out}")
    assert not problems, "\n".join(problems)
    assert (tmp_path / "existing" / META).read_bytes() == existing_meta
    assert leftovers(tmp_path) == [] and list_runs(tmp_path) == [tmp_path / "existing"]
