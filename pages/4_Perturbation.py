"""Perturbation: where does merging the value help, where does it hurt, and does the prediction move?

Opens a study directory under runs/ (``$KVLENS_RUNS`` overrides) holding ``perturbation.json`` (from
``python -m experiments.perturbation MODE``) or the starter Fig. 2 study, or runs a small study here
on the embedded model and saves it there with the same files as the command. Below, the merge
design space: a study directory holding ``merges.json`` (``python -m experiments.merges``) shown as
the space figure, the selection and confirmation, and the cascade. All logic lives in analysis/.
"""

import json
import time
from pathlib import Path

import streamlit as st

from analysis.app import dashboard, starter
from analysis.compress import compresses, method_names
from analysis.io import check_out_dir
from analysis.perturbation.study import MODES, RESULTS, Settings, run_study
from analysis.perturbation.texts import MIXED, study_sequences, study_source
from analysis.report.merges import fig_cascade, fig_space
from analysis.report.perturbation import fig_fig2, fig_head_heatmap, fig_ideal, fig_layer_deviation, fig_positions
from analysis.report.save import save_study
from analysis.text.corpora import CORPORA

MIXED_LABEL = " + ".join(MIXED)  # the command's default: the sequences split between books and web


def study_dirs(root: Path) -> list[Path]:
    """Directories directly under ``root`` holding a perturbation.json, newest first."""
    found = [p for p in root.iterdir() if (p / RESULTS).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


@st.cache_data(show_spinner=False)
def load_summary(path: str, stamp: float) -> dict:
    """The study's JSON; ``stamp`` (mtime) invalidates the cache when the directory is replaced."""
    return json.loads(Path(path).read_text())


def small_study(root: Path) -> None:
    """Sidebar form: a small study on the embedded model, saved as root/<name>."""
    with st.sidebar.form("small_study"):
        st.subheader("Run a small study (embedded model)")
        mode = st.selectbox("mode", MODES, key="new_mode")
        corpus = st.selectbox("corpus", [*CORPORA, MIXED_LABEL], key="new_corpus")
        sequences = st.number_input("sequences", 1, 16, 2, key="new_sequences")
        tokens = st.number_input("tokens (sweep, end2end, ideal)", 32, 2048, 256, step=32, key="new_tokens")
        t0 = st.number_input("t0 (fig2)", 8, 1024, 100, key="new_t0")
        future = st.number_input("future queries (fig2, ideal)", 1, 1024, 100, key="new_future")
        budgets = st.text_input("budgets (sweep, end2end)", "64", key="new_budgets")
        methods = st.multiselect("methods (sweep, end2end)", method_names(compressing=True, presets=True),
                                 default=["weightedkv", "weightedkv_evict"], key="new_methods")
        layers = st.text_input("layers (empty: all)", "0,10,20,29", key="new_layers")
        name = st.text_input("run name", "", placeholder=f"perturb-{mode}", key="new_name")
        start = st.form_submit_button("Run study")
    if not start:
        return

    tokens, future = int(tokens), int(future)
    # the command's options, checked by the same library function; ideal merges once, as late as the text allows
    settings = Settings.from_options(
        mode, tokens=tokens, sequences=int(sequences), layers=layers.strip() or None, budget=budgets,
        methods=list(methods) if mode in ("sweep", "end2end") else "weightedkv,weightedkv_evict",
        t0=int(t0), future=future, steps=str(max(2, tokens - future - 1)) if mode == "ideal" else None)
    out = check_out_dir(root / (name.strip() or f"perturb-{mode}-{time.strftime('%H%M%S')}"))
    loaded = dashboard.cached_model()
    corpus = None if corpus == MIXED_LABEL else corpus
    seqs = study_sequences(loaded.tokenizer, settings.tokens, int(sequences), corpus=corpus, mode=mode)
    # captures and compressed caches switch the shared model's attention: one job at a time
    with dashboard.model_lock(), dashboard.progress(f"{mode} study") as bar:
        summary, tensors = run_study(loaded, seqs, settings, progress=starter.counter(len(seqs), bar),
                                     source=study_source(corpus))
    save_study(out, summary, tensors, png=False)
    st.session_state["study"] = out.name
    st.success(f"saved {out}")


def show(summary: dict) -> None:
    mode = summary["mode"]
    st.caption(f"{mode} · {summary['model']} · {summary['sequences']} sequence(s) of {summary['tokens']} tokens "
               f"({', '.join(summary['text_ids'][:4])}{'…' if len(summary['text_ids']) > 4 else ''})")
    methods = [m for m in summary["methods"] if compresses(m)]
    if mode == "fig2":
        metric = st.selectbox("metric", ["rel_error", "attn_cosine", "attn_cosine_padded"], key="metric")
        st.plotly_chart(fig_fig2(summary, metric), key="fig2")
        c1, c2 = st.columns(2)
        c1.plotly_chart(fig_head_heatmap(summary, "weightedkv", None, metric), key="heads")
        c2.plotly_chart(fig_head_heatmap(summary, "weightedkv", None, metric, minus="weightedkv_evict"), key="diff")
    elif mode == "sweep":
        c1, c2 = st.columns(2)
        method = c1.selectbox("method", methods, key="method")
        budget = c2.selectbox("budget", summary["budgets"], key="budget")
        c1, c2 = st.columns(2)
        c1.plotly_chart(fig_head_heatmap(summary, method, budget), key="heads")
        if {"weightedkv", "weightedkv_evict"} <= set(methods):
            c2.plotly_chart(fig_head_heatmap(summary, "weightedkv", budget, minus="weightedkv_evict"), key="diff")
    elif mode == "end2end":
        c1, c2 = st.columns([3, 1])
        chosen = c1.multiselect("methods", methods, default=methods, key="methods")
        budget = c2.selectbox("budget", summary["budgets"], key="budget")
        st.plotly_chart(fig_positions(summary, budget, "kl", chosen), key="kl")
        st.plotly_chart(fig_positions(summary, budget, "delta_nll", chosen), key="dnll")
        st.plotly_chart(fig_layer_deviation(summary, budget, chosen), key="deviation")
    else:
        layer = st.selectbox("layer", ["all"] + summary["layers"], key="layer")
        st.plotly_chart(fig_ideal(summary, None if layer == "all" else layer), key="ideal")
    with st.expander("result rows"):
        st.dataframe([{k: v for k, v in r.items() if k not in ("steps", "curve", "curve_std", "per_sequence")}
                      for r in summary["results"]], key="rows", hide_index=True)


MERGES = "merges.json"


def merge_space(root: Path) -> None:
    """The merge design space from a merge study directory under ``root``, if there is one."""
    st.header("The merge design space")
    found = sorted((p for p in root.iterdir() if (p / MERGES).is_file()), key=lambda p: p.stat().st_mtime,
                   reverse=True) if root.is_dir() else []
    if not found:
        st.caption(f"No merge study in {root}/ yet: `python -m experiments.merges --out {root}/merges` "
                "(see docs/results.md for a size that fits a laptop).")
        return
    name = st.selectbox("merge study", [p.name for p in found], key="merge_study")
    path = root / name / MERGES
    result = load_summary(str(path), path.stat().st_mtime)
    st.plotly_chart(fig_space(result), key="merge_space")
    if result.get("selection"):  # experiments.merges; the figures command's merge_space has no selection
        st.caption(f"chosen on {', '.join(result['selection']['corpora'])}: "
                   f"{', '.join(result['selection']['chosen'])}; confirmed on "
                   f"{', '.join(result['confirmation']['corpora'])} (documents the choice never saw)")
        st.dataframe(result["confirmation"]["results"], key="merge_confirm", hide_index=True)
    if result.get("cascade"):
        st.plotly_chart(fig_cascade(result["cascade"]), key="merge_cascade")
        st.dataframe([{"variant": v, **{k: x[k] for k in ("mean_depth", "merged_share", "max_depth", "distance_mean",
                                                            "distance_median")}, "gap_at": x["gap_at"]}
                      for v, x in result["cascade"]["variants"].items()], key="merge_cascade_rows", hide_index=True)


def main() -> None:
    st.title("Perturbation: merging vs evicting, head by head and end to end")
    root = dashboard.show_runs_root()
    small_study(root)
    dirs = study_dirs(root)
    if not dirs:
        st.info(f"No perturbation studies in {root}/ yet, so this shows the starter Fig. 2 study. Run a small one "
                f"from the sidebar, or `python -m experiments.perturbation fig2 --sequences 2 --out {root}/fig2`.")
    path = dashboard.pick_result(dirs, "study", starter.FIG2_LABEL, "fig2") / RESULTS
    show(load_summary(str(path), path.stat().st_mtime))
    merge_space(root)


with dashboard.user_errors():
    main()
