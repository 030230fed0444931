"""Perplexity: what compressing the cache costs (WeightedKV Table I and Fig. 4).

Shows a sweep directory under runs/ (``$KVLENS_RUNS`` overrides) holding ``perplexity.json``
(from ``python -m experiments.perplexity``), or runs a quick sweep here on the embedded model and
saves it there with the same files as the command.
"""

import json
import time
from pathlib import Path

import streamlit as st

from analysis.app import dashboard
from analysis.compress import compresses, method_names
from analysis.io import check_out_dir
from analysis.perplexity.settings import sweep_settings
from analysis.report.perplexity import fig_ppl_vs_budget, fig_running_log_ppl, table_rows
from analysis.report.save import save_sweep
from analysis.text.corpora import CORPORA

QUICK_METHODS = ["weightedkv", "weightedkv_evict", "streaming_llm"]


def sweep_dirs(root: Path) -> list[Path]:
    """Directories directly under ``root`` that hold a perplexity.json, newest first."""
    found = [p for p in root.iterdir() if (p / "perplexity.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def quick_sweep(root: Path) -> None:
    """Sidebar form: a small sweep on the embedded model, saved as root/<name>."""
    with st.sidebar.form("quick_sweep"):
        st.subheader("Run a quick sweep (embedded model)")
        corpus = st.selectbox("corpus", list(CORPORA), key="corpus")
        tokens = st.number_input("tokens", 64, 8192, 512, step=64, key="tokens")
        window = st.number_input("window", 8, 2048, 256, step=8, key="window")
        budgets = st.text_input("budgets", "64,128", key="budgets")
        methods = st.multiselect("methods", method_names(presets=True), default=QUICK_METHODS, key="methods")
        png = st.checkbox("PNG figures too (needs chromium)", key="png")
        name = st.text_input("run name", "", placeholder=f"ppl-{corpus}-{tokens}", key="name")
        start = st.form_submit_button("Run sweep")
    if not start:
        return

    tokens, window = int(tokens), int(window)
    settings = sweep_settings(list(methods), budgets, tokens, window)  # the command's checks and messages
    out = check_out_dir(root / (name.strip() or f"ppl-{corpus}-{tokens}-{time.strftime('%H%M%S')}"))
    summary, tensors = dashboard.sweep_embedded(corpus, tokens, window, settings.methods, settings.budgets)
    save_sweep(out, summary, tensors, png=png)
    st.session_state["sweep"] = out.name  # show the new sweep
    st.success(f"saved {out}")


def show(summary: dict) -> None:
    st.caption(f"{summary['model']} · {summary['windows']} window(s) of {summary['window']} tokens "
               f"(stride {summary['stride']}) from {summary['documents']} document(s) of {summary['tokens']} tokens")
    results = summary["results"]
    st.subheader("Perplexity (Table I layout)")
    st.dataframe(table_rows(results), key="table", hide_index=True)
    st.plotly_chart(fig_ppl_vs_budget(summary), key="fig_ppl_vs_budget")

    st.subheader("Running log-perplexity")
    present = [m for m in summary["methods"] if any(r["method"] == m for r in results)]
    budgets = sorted({r["budget"] for r in results if compresses(r["method"])})
    c1, c2 = st.columns([3, 1])
    methods = c1.multiselect("methods", present, default=present, key="curve_methods")
    budget = c2.selectbox("budget", budgets, key="curve_budget") if budgets else None
    st.plotly_chart(fig_running_log_ppl(summary, methods, budget), key="fig_running_log_ppl")

    st.subheader("Speed")
    st.caption("Methods at the same budget are decoded together, as rows of one batch, so they share one time: "
               "compare budgets and `full` here; one method's step cost against another's is "
               "`python -m experiments.bench.compress step`.")
    st.dataframe(speed_rows(results), key="speed", hide_index=True)


def speed_rows(results: list[dict]) -> list[dict]:
    """One row per decode group (``full`` alone, then each budget's methods together)."""
    groups: dict = {}
    for r in results:
        groups.setdefault(r["budget"] if compresses(r["method"]) else "full", []).append(r)
    rows = []
    for key, group in groups.items():
        seconds = sum(r["seconds"] for r in group)
        scored = sum(r["tokens_per_second"] * r["seconds"] for r in group if r["tokens_per_second"])
        rows.append({"budget": "all (full)" if key == "full" else key,
                     "decoded together": ", ".join(r["method"] for r in group),
                     "seconds": round(seconds, 2), "tokens/s": round(scored / seconds, 1) if seconds else None})
    return rows


def main() -> None:
    st.title("Perplexity under a compressed cache")
    root = dashboard.show_runs_root()
    quick_sweep(root)
    dirs = sweep_dirs(root)
    if not dirs:
        st.info(f"No perplexity sweeps in {root}/ yet, so this shows the starter sweep. Run a quick one from the "
                f"sidebar, or `python -m experiments.perplexity --tokens 1024 --window 512 --out {root}/ppl`.")
    path = dashboard.pick_result(dirs, "sweep", dashboard.STARTER_LABEL, "sweep")

    show(json.loads((path / "perplexity.json").read_text()))


with dashboard.user_errors():
    main()
