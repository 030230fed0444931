"""Spectra: are keys lower-rank than values? (WeightedKV Fig. 1, per layer and head.)

Source: a directory under runs/ (``$KVLENS_RUNS`` overrides), either a spectra output
(``spectra.json``, from ``python -m experiments.spectra``) or a capture run (analysis.runtime.runs), or a
small capture computed here on the embedded default model. All logic lives in analysis/.
"""

import json
from pathlib import Path

import streamlit as st

from analysis.app.dashboard import STARTER_LABEL, capture_embedded, runs_root, show_runs_root, starter_capture
from analysis.errors import UserError
from analysis.report.lowrank import compare_table, fig_energy_lost, fig_ppl_vs_bytes, fig_rank_cost
from analysis.report.spectra import fig_key_vs_value, fig_rank_heatmaps, fig_rope_keys
from analysis.runtime.runs import load_run
from analysis.spectra.compute import DEFAULT_KINDS, LABELS, SpectraResult, compute_spectra, summary_sentence
from analysis.text.corpora import CORPORA

METRICS = {"rank_90": "rank at 90% energy", "rank_99": "rank at 99% energy", "effective_rank": "effective rank"}


@st.cache_data(show_spinner="Computing spectra...")
def result_from_dir(path: str, stamp: float, center: bool) -> dict:
    """SpectraResult (as JSON) of a run directory; ``stamp`` (mtime) invalidates the cache."""
    p = Path(path)
    if (p / "spectra.json").is_file():
        return json.loads((p / "spectra.json").read_text())
    capture = load_run(p)
    return compute_spectra(capture, kinds=_kinds_of(capture), center=center).to_json()


def _kinds_of(capture) -> list[str]:
    return [k for k in DEFAULT_KINDS if k in capture.kinds]


def compute_small(corpus: str, tokens: int, sequences: int, center: bool) -> dict:
    capture = capture_embedded(corpus, tokens, sequences)
    return compute_spectra(capture, kinds=_kinds_of(capture), center=center).to_json()


def choose_source() -> dict | None:
    st.sidebar.header("Source")
    center = st.sidebar.checkbox("mean-centre over tokens", key="center",
                                 help="Ignored for spectra.json runs, which were computed with their own setting.")
    mode = st.sidebar.radio("data", ["run directory", "compute (embedded model)"], key="mode")
    if mode == "run directory":
        root = show_runs_root()
        runs = sorted(p.name for p in root.iterdir()
                      if (p / "spectra.json").is_file() or (p / "meta.json").is_file()) if root.is_dir() else []
        if not runs:
            st.info(f"No run directories under {root} yet, so this shows the starter capture. Make one with "
                    f"`python -m experiments.spectra --out {root}/spectra`, or compute a small capture here.")
        name = st.sidebar.selectbox("run", runs + [STARTER_LABEL], key="run")
        path = starter_capture() if name == STARTER_LABEL else root / name  # the starter: computed once
        return result_from_dir(str(path), path.stat().st_mtime, center)
    corpus = st.sidebar.selectbox("corpus", list(CORPORA), key="corpus")
    tokens = st.sidebar.number_input("tokens", 64, 2048, 256, step=64, key="tokens")
    sequences = st.sidebar.number_input("sequences", 1, 10, 1, key="sequences")
    wanted = (corpus, int(tokens), int(sequences), center)
    if st.sidebar.button("Compute", key="compute"):
        st.session_state["computed"] = (wanted, compute_small(*wanted))
    got = st.session_state.get("computed")
    if got is None:
        st.info("Choose a corpus and size, then press Compute (about 1 s per 100 tokens on CPU).")
        return None
    if got[0] != wanted:
        st.caption("Showing the previous computation; press Compute to apply the new settings.")
    return got[1]


def main() -> None:
    st.title("Key and value spectra")
    st.caption("Singular values of each sequence's T x d matrix per (layer, head); σᵢ/σ₁ normalisation, "
               "energy = σ², effective rank = exp(entropy of σ/Σσ).")
    data = choose_source()
    if data is None:
        return
    result = SpectraResult.from_json(data)
    st.success(summary_sentence(result))
    kv_kinds = [k for k in ("key_pre_rope", "key_post_rope", "value") if k in result.kinds]
    kv_heads = result.num_heads(kv_kinds[0]) if kv_kinds else 1
    c1, c2, c3, c4 = st.columns(4)
    layer = c1.selectbox("layer", ["all"] + result.layers, key="layer")
    head = c2.selectbox("KV head", ["all"] + list(range(kv_heads)), key="head")
    kind = c3.selectbox("kind", result.kinds, format_func=lambda k: LABELS.get(k, k), key="kind")
    metric = c4.selectbox("metric", list(METRICS), format_func=METRICS.get, key="metric")
    layer = None if layer == "all" else int(layer)
    head = None if head == "all" else int(head)

    heads = None
    if head is not None and kind == "query_post_rope":  # the query heads sharing this KV head
        group = result.num_heads(kind) // kv_heads
        heads = range(head * group, (head + 1) * group)
    rows = [r for r in result.select(kind, layer) if heads is None and (head is None or r.head == head)
            or heads is not None and r.head in heads]
    field = {"rank_90": "rank_90_mean", "rank_99": "rank_99_mean"}.get(metric, metric)
    value = sum(getattr(r, field) for r in rows) / len(rows)
    st.metric(f"{METRICS[metric]} of {LABELS.get(kind, kind)} (mean over {len(rows)} head(s))",
              f"{value:.1f} / {result.head_dim}")

    if kv_kinds:
        st.plotly_chart(fig_key_vs_value(result, layer, head), key="fig_key_vs_value")
    st.plotly_chart(fig_rank_heatmaps(result, metric), key="fig_rank_heatmaps")
    if {"key_pre_rope", "key_post_rope"} <= set(result.kinds):
        rl = result.layers[len(result.layers) // 2] if layer is None else layer
        rh = 0 if head is None else head
        if layer is None or head is None:
            st.caption(f"RoPE figure: pick a layer and a KV head; showing layer {rl}, head {rh}.")
        st.plotly_chart(fig_rope_keys(result, rl, rh), key="fig_rope_keys")
    compression(result)


def _results(name: str) -> list[Path]:
    root = runs_root()
    return sorted(p for p in root.iterdir() if (p / name).is_file()) if root.is_dir() else []


def compression(result: SpectraResult) -> None:
    """From spectra to compression: what rank r costs each head, and perplexity against cache bytes."""
    st.header("From spectra to compression: low-rank keys")
    rank = st.slider("rank r", 1, result.head_dim, min(8, result.head_dim), key="lowrank_rank")
    if {"key_pre_rope", "value"} & set(result.kinds):
        st.plotly_chart(fig_energy_lost(result, rank), key="fig_energy_lost")
    costs = _results("cost.json")
    if costs:
        path = st.selectbox("rank-cost run", costs, format_func=lambda p: p.name, key="cost_run")
        st.plotly_chart(fig_rank_cost(json.loads((path / "cost.json").read_text())), key="fig_rank_cost")
    compares = _results("compare.json")
    if not compares:
        st.info("No comparison yet. Make one: `python -m experiments.lowrank calibrate --corpus books --documents 4 "
                f"--out {runs_root()}/basis`, then `python -m experiments.lowrank compare --basis {runs_root()}/basis "
                f"--corpus books --out {runs_root()}/lowrank` (and `cost` for the per-head view).")
        return
    path = st.selectbox("comparison run", compares, format_func=lambda p: p.name, key="compare_run")
    compare = json.loads((path / "compare.json").read_text())
    st.plotly_chart(fig_ppl_vs_bytes(compare), key="fig_ppl_vs_bytes")
    st.dataframe(compare_table(compare), hide_index=True)


try:
    main()
except UserError as e:
    st.error(str(e))
