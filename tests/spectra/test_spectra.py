"""Spectra: metrics on synthetic matrices, errors, JSON, figures, the command and the dashboard page."""

from __future__ import annotations

import json
import shutil

import numpy as np
import plotly.graph_objects as go
import pytest
import scipy.linalg
import torch
from streamlit.testing.v1 import AppTest

from analysis.errors import UserError
from analysis.models.loading import LoadedModel
from analysis.report.export import write_figure
from analysis.report.spectra import fig_key_vs_value, fig_rank_heatmaps, standard_figures
from analysis.runtime.capture import capture_sequences
from analysis.runtime.runs import save_run
from analysis.spectra.compute import SpectraResult, compute_spectra, summary_sentence
from experiments.bench.spectra import RandomCapture, loop_spectra
from experiments.spectra import main
from tests.conftest import REPO, needs_setup

KV = ("key_pre_rope", "key_post_rope", "value")


class FakeCapture:
    """Just what compute_spectra reads: .get(layer, kind) -> (B, H, T, D), .layers, .kinds, .meta."""

    def __init__(self, tensors: dict[str, list[torch.Tensor]]):
        self.tensors = tensors  # kind -> one (B, H, T, D) tensor per layer
        self.kinds = list(tensors)
        self.layers = list(range(len(next(iter(tensors.values())))))
        self.meta = {"model": "fake", "config": {"num_layers": len(self.layers)}}

    def get(self, layer, kind):
        return self.tensors[kind][layer]


def low_rank(rank, B=2, H=2, T=96, D=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, rank, generator=g, dtype=dtype) @ torch.randn(rank, D, generator=g, dtype=dtype)


def fake(layers=2, **kinds) -> FakeCapture:
    return FakeCapture({k: [v(seed=i) for i in range(layers)] for k, v in kinds.items()})


def test_rank_r_matrix():
    r = 3
    res = compute_spectra(fake(value=lambda seed: low_rank(r, seed=seed)), kinds=["value"])
    for row in res.heads:
        assert row.rank_99 == r and row.rank_99_mean == r
        assert row.rank_90 <= r
        assert 1 <= row.effective_rank <= r + 1e-9
        # zero singular values come out at the float64-Gram floor, ~sqrt(eps) = 1e-8 of sigma_1
        assert row.singular_values[0] == 1.0 and max(row.singular_values[r:]) < 1e-7


def test_rotation_invariance():
    x = [low_rank(5, seed=s) + 0.1 * low_rank(16, seed=10 + s) for s in range(2)]
    q, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    a = compute_spectra(FakeCapture({"value": x}), kinds=["value"])
    b = compute_spectra(FakeCapture({"value": [t @ q for t in x]}), kinds=["value"])  # rotate head_dim
    for ra, rb in zip(a.heads, b.heads):
        np.testing.assert_allclose(ra.singular_values, rb.singular_values, atol=1e-10)
        assert ra.rank_90 == rb.rank_90 and ra.rank_99 == rb.rank_99
        assert ra.effective_rank == pytest.approx(rb.effective_rank, rel=1e-10)


def test_matches_scipy():
    x = torch.randn(1, 3, 80, 16, generator=torch.Generator().manual_seed(2))  # float32 path
    res = compute_spectra(FakeCapture({"key_post_rope": [x]}), kinds=["key_post_rope"])
    for row in res.heads:
        s = scipy.linalg.svdvals(x[0, row.head].double().numpy())
        np.testing.assert_allclose(row.singular_values, s / s[0], rtol=1e-4)
        p = s / s.sum()
        assert row.effective_rank == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-4)
        cum = np.cumsum(s**2) / (s**2).sum()
        assert row.rank_90 == int(np.argmax(cum >= 0.90)) + 1


def test_centering_removes_constant_offset():
    offset = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5
    cap = fake(value=lambda seed: low_rank(2, seed=seed) + offset)  # offset adds one dimension
    plain = compute_spectra(cap, kinds=["value"])
    centred = compute_spectra(cap, kinds=["value"], center=True)
    assert all(r.rank_99_mean == 3 for r in plain.heads)
    assert all(r.rank_99_mean == 2 and r.singular_values[2] < 1e-7 for r in centred.heads)


def test_json_round_trip_and_summary():
    cap = fake(key_pre_rope=lambda seed: low_rank(2, seed=seed), key_post_rope=lambda seed: low_rank(6, seed=seed),
               value=lambda seed: low_rank(14, seed=seed))
    res = compute_spectra(cap, kinds=list(KV))
    d = json.loads(json.dumps(res.to_json()))
    assert set(d) >= {"model", "tokens", "sequences", "center", "normalisation", "heads", "summary"}
    assert set(d["heads"][0]) >= {"layer", "head", "kind", "singular_values", "singular_values_std",
                                  "effective_rank", "rank_90", "rank_99"}
    assert d["summary"]["keys_lower_rank_than_values"] == {"key_pre_rope": 1.0, "key_post_rope": 1.0}
    assert SpectraResult.from_json(d).to_json() == d
    text = summary_sentence(res)
    assert text.startswith("Pre-RoPE keys need 2.0 of 16 dimensions") and "100%" in text and "4 (layer" in text


def test_bad_inputs():
    cap = fake(value=lambda seed: low_rank(2, seed=seed))
    with pytest.raises(UserError, match="key_pre_rope"):
        compute_spectra(cap, kinds=["key_pre_rope"])
    with pytest.raises(UserError, match="layer 7"):
        compute_spectra(cap, kinds=["value"], layers=[7])
    short = fake(value=lambda seed: low_rank(2, T=8, seed=seed))
    with pytest.raises(UserError, match=r"T=8.*head_dim=16.*--tokens >= 16"):
        compute_spectra(short, kinds=["value"])
    with pytest.raises(UserError):
        SpectraResult.from_json({"model": "x"})


def test_batched_equals_per_head_loop():

    cap = RandomCapture(layers=2, tokens=80, head_dim=16)
    ref = loop_spectra(cap)
    for row in compute_spectra(cap).heads:
        want = ref[(row.layer, row.head, row.kind)]
        np.testing.assert_allclose(row.singular_values, want["singular_values"].numpy(), rtol=1e-5)
        assert row.rank_90_mean == float(want["rank_90_mean"])


def test_figures_state_normalisation():

    cap = fake(key_pre_rope=lambda seed: low_rank(2, seed=seed), key_post_rope=lambda seed: low_rank(6, seed=seed),
               value=lambda seed: low_rank(14, seed=seed))
    res = compute_spectra(cap, kinds=list(KV))
    figs = standard_figures(res)
    assert set(figs) == {"key_vs_value", "rank_90_heatmaps", "effective_rank_heatmaps", "rope_keys_layer1_head0"}
    assert "σᵢ/σ₁" in fig_key_vs_value(res, 0, 1).layout.title.text
    assert fig_key_vs_value(res).layout.yaxis.type == "log"
    assert len(fig_rank_heatmaps(res).data) == 3
    with pytest.raises(UserError):
        fig_rank_heatmaps(res, "nope")


def test_write_figure(tmp_path, monkeypatch):


    fig = go.Figure(go.Scatter(y=[1, 2, 3]))
    html = write_figure(fig, tmp_path, "a", png=False)
    assert [p.name for p in html] == ["a.html"] and "plotly.js" in html[0].read_text()[:20000].lower()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-such-chrome"))
    with pytest.raises(UserError, match="apt-get install chromium"):
        write_figure(fig, tmp_path, "b")
    monkeypatch.delenv("BROWSER_PATH")
    if not (shutil.which("chromium") or shutil.which("google-chrome")):
        needs_setup("PNG export: no chromium installed (apt-get install chromium)")
    files = write_figure(fig, tmp_path, "c")
    assert [p.name for p in files] == ["c.html", "c.png"]
    assert files[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_run(tmp_path, tiny_model):
    """A saved capture of the tiny llama (4 layers, 4 query / 2 KV heads, head_dim 16), 2 x 40 tokens."""

    loaded = LoadedModel(tiny_model("llama"), None, "tiny-llama", torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    seqs = [(f"s{i}", torch.randint(0, 100, (40,), generator=gen).tolist()) for i in range(2)]
    return save_run(capture_sequences(loaded, seqs, progress=False), tmp_path / "runs" / "tiny")


def test_command_on_saved_run(tiny_run, tmp_path, capsys):

    out = tmp_path / "out"
    main(["--run", str(tiny_run), "--layers", "0,2-3", "--no-png", "--out", str(out), "--quiet"])
    d = json.loads((out / "spectra.json").read_text())
    assert d["layers"] == [0, 2, 3] and d["tokens"] == 40 and d["sequences"] == 2
    assert len(d["heads"]) == 3 * (2 + 2 + 2 + 4)
    assert {p.name for p in out.iterdir()} >= {"key_vs_value.html", "rank_90_heatmaps.html"}
    assert "dimensions for 90% energy" in capsys.readouterr().out
    with pytest.raises(UserError, match="--overwrite"):
        main(["--run", str(tiny_run), "--no-png", "--out", str(out)])
    with pytest.raises(UserError, match="layer 9"):
        main(["--run", str(tiny_run), "--layers", "9", "--no-png", "--out", str(tmp_path / "o2")])


def test_dashboard_page(tiny_run, monkeypatch):

    monkeypatch.setenv("KVLENS_RUNS", str(tiny_run.parent))
    at = AppTest.from_file(str(REPO / "pages" / "1_Spectra.py"), default_timeout=60).run()
    assert not at.exception and not at.error
    assert "dimensions for 90% energy" in at.success[0].value
    assert len(at.get("plotly_chart")) == 4  # key vs value, rank heatmaps, RoPE, energy lost at rank r
    at.selectbox(key="layer").set_value(2).run()
    at.selectbox(key="head").set_value(1).run()
    at.selectbox(key="kind").set_value("query_post_rope").run()
    at.selectbox(key="metric").set_value("effective_rank").run()
    assert not at.exception and not at.error
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert "layer 2, head 1" in spec["layout"]["title"]["text"]
    assert at.metric[0].value.endswith("/ 16")


def test_command_bad_inputs_leave_nothing(tiny_model, tmp_path):

    loaded = LoadedModel(tiny_model("llama"), None, "tiny-llama", torch.device("cpu"), torch.float32)
    values_only = save_run(capture_sequences(loaded, [("s", list(range(40)))], kinds=("value",), progress=False),
                           tmp_path / "values-only")
    with pytest.raises(UserError, match="has no key_pre_rope, key_post_rope, query_post_rope.*--kinds value"):
        main(["--run", str(values_only), "--no-png", "--out", str(tmp_path / "o1"), "--quiet"])
    empty = tmp_path / "empty-corpus"
    empty.mkdir()
    with pytest.raises(UserError, match="empty-corpus"):
        main(["--text", str(empty), "--no-png", "--out", str(tmp_path / "o2"), "--quiet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-corpus", "values-only"]  # no output, no temp dir
