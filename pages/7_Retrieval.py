"""Retrieval: does a fact far back survive compression? A passkey or a needle, asked for at the end.

Shows a result directory under runs/ (``$KVLENS_RUNS`` overrides) holding ``retrieval.json`` (from
``python -m experiments.retrieval``), or runs a small grid here on the embedded model and saves it
there with the command's files. One trial's context is shown with the needle highlighted, beside
each method's answer.
"""

import html
import json
import time
from pathlib import Path

import streamlit as st

from analysis.app import dashboard, starter
from analysis.compress import METHODS
from analysis.io import check_out_dir
from analysis.report.retrieval import fig_fates, fig_needle_heatmap, fig_retrieval_vs_budget, pooled, save_retrieval
from analysis.retrieval.grid import MODES, retrieval_settings
from analysis.retrieval.tasks import TASKS
from analysis.text.corpora import CORPORA, load_documents

QUICK_METHODS = ["full", "weightedkv", "weightedkv_evict", "streaming_llm"]
SHOWN = 1500  # characters of context shown on each side of the needle


def result_dirs(root: Path) -> list[Path]:
    """Directories directly under ``root`` that hold a retrieval.json, newest first."""
    found = [p for p in root.iterdir() if (p / "retrieval.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def quick_grid(root: Path) -> None:
    """Sidebar form: a small grid on the embedded model, saved as root/<name>."""
    with st.sidebar.form("quick_grid"):
        st.subheader("Run a small grid (embedded model)")
        task = st.selectbox("task", list(TASKS), key="task")
        corpus = st.selectbox("haystack corpus (needle)", list(CORPORA), key="corpus")
        mode = st.selectbox("mode", list(MODES), key="mode")
        lengths = st.text_input("lengths (tokens)", "256", key="lengths")
        depths = st.text_input("depths (%)", "0,50,100", key="depths")
        budgets = st.text_input("budgets", "32", key="budgets")
        methods = st.multiselect("methods", list(METHODS), default=QUICK_METHODS, key="methods")
        trials = st.number_input("trials", 1, 50, 1, key="trials")
        protect = st.checkbox("keep the question out of compression", key="protect")
        name = st.text_input("run name", "", placeholder=f"retrieval-{task}", key="name")
        start = st.form_submit_button("Run grid")
    if not start:
        return
    settings = retrieval_settings(task, mode, lengths, depths, budgets, list(methods), int(trials),
                                  protect_question=protect)  # the command's checks and messages
    out = check_out_dir(root / (name.strip() or f"retrieval-{task}-{time.strftime('%H%M%S')}"))
    docs = load_documents(corpus=corpus) if task == "needle" else None
    result = dashboard.retrieval_embedded(settings, docs)
    if task == "needle":
        result["source"] = {"corpus": corpus}
    save_retrieval(out, result, png=False)
    st.session_state["result"] = out.name  # show the new result
    st.success(f"saved {out}")


def highlighted(example: dict) -> str:
    """The context as HTML, the needle marked, long stretches around it cut."""
    before, after = example["before"], example["after"]
    if len(before) > SHOWN:
        before = "…" + before[-SHOWN:]
    if len(after) > SHOWN:
        after = after[:SHOWN] + "…"
    esc = lambda t: html.escape(t).replace("\n", "<br>")  # noqa: E731
    return (f"<div style='font-size:0.85em;line-height:1.5'>{esc(before)}<mark><b>{esc(example['needle'])}</b></mark>"
            f"{esc(after)}<br><i>{esc(example['question'])}</i></div>")


def show_trial(result: dict) -> None:
    st.subheader("One trial: the context, and what each method answered")
    examples = result["examples"]
    labels = [f"{e['length']} tokens, depth {e['depth']}%" for e in examples]
    pick = st.selectbox("trial 0 at", range(len(examples)), format_func=lambda i: labels[i], key="example")
    example = examples[pick]
    answers = [{"method": t["method"], "budget": t["budget"] or "full", "answered": t["said"],
                "correct": "yes" if t["correct"] else "no", "answer log-prob": t["answer_logprob"],
                "kept": t["fate_kept"], "merged": t["fate_merged"], "gone": t["fate_gone"]}
               for t in result["trials"]
               if t["trial"] == 0 and t["length"] == example["length"] and t["depth"] == example["depth"]]
    st.markdown(f"Answer: **{html.escape(example['answer'])}**")
    st.dataframe(answers, key="answers", hide_index=True)
    with st.expander("context (needle highlighted)", expanded=True):
        st.markdown(highlighted(example), unsafe_allow_html=True)


def show(result: dict) -> None:
    s = result["settings"]
    st.caption(f"{result['model']} · {s['task']}, {s['mode']} mode · lengths {s['lengths']} · depths {s['depths']} % · "
               f"{s['trials']} trial(s) per cell" + (" · question kept out of compression" if s["protect_question"]
                                                     else ""))
    st.subheader("Accuracy per method and budget (every length and depth)")
    st.dataframe([{"method": p["method"], "budget": p["budget"] or "full", "correct": f"{p['correct']}/{p['trials']}",
                   "accuracy": round(p["accuracy"], 3), "95% interval": f"[{p['ci_low']:.2f}, {p['ci_high']:.2f}]",
                   "answer log-prob": round(p["answer_logprob"], 3)} for p in pooled(result)],
                 key="pooled", hide_index=True)
    st.plotly_chart(fig_needle_heatmap(result), key="fig_heatmap")
    st.plotly_chart(fig_retrieval_vs_budget(result), key="fig_budget")
    st.subheader("Where the fact went")
    st.caption("Once the cache holds the prompt: for each answer token of the fact in the context, the share of "
               "(layer, KV head) pairs where its value is in its own slot (kept, with its key), only inside other "
               "slots' values (merged, no key) or nowhere (gone).")
    st.plotly_chart(fig_fates(result), key="fig_fates")
    st.dataframe(result["by_fate"], key="by_fate", hide_index=True)
    if result.get("paired"):  # a merging method and its own eviction ablation both ran
        st.subheader("Merge against its own eviction, trial by trial")
        st.caption("Same prompts, same budget: how often the merge gives the answer the higher log-probability "
                   "(two-sided sign test, ties left out), and who answered right.")
        st.dataframe(result["paired"], key="paired", hide_index=True)
    show_trial(result)


def main() -> None:
    st.title("Retrieval under a compressed cache")
    root = dashboard.show_runs_root()
    quick_grid(root)
    dirs = result_dirs(root)
    if not dirs:
        st.info(f"No retrieval results in {root}/ yet, so this shows the starter grid. Run a small one from the "
                f"sidebar, or `python -m experiments.retrieval passkey --lengths 1024 --out {root}/passkey`.")
    path = dashboard.pick_result(dirs, "result", starter.RETRIEVAL_LABEL, "retrieval")
    show(json.loads((path / "retrieval.json").read_text()))


with dashboard.user_errors():
    main()
