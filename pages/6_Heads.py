"""Heads: which (layer, KV head) to compress. Profile table, rank vs sensitivity, heatmaps, a budget plan.

Reads a profile directory under runs/ (``$KVLENS_RUNS`` overrides) holding ``profile.json`` from
``python -m experiments.heads profile``, or the starter profile. A plan starts from the greedy rule
or a baseline at the chosen total memory, can be edited head by head, downloaded as the JSON the
cache accepts, and evaluated against uniform WeightedKV at equal memory on text the profile did not see.
"""

import json
from pathlib import Path

import streamlit as st

from analysis.app import dashboard, starter
from analysis.heads.allocate import BASELINES, baseline, greedy_plan
from analysis.heads.evaluate import evaluate_plans, evaluation_options, evaluation_sequences
from analysis.heads.profile import measures
from analysis.jobs.plan import Plan
from analysis.perplexity.windows import make_windows
from analysis.report.heads import fig_evaluation, fig_heatmap, fig_plan_heatmap, fig_scatter, table_rows
from analysis.text.corpora import CORPORA, bos_id

STARTS = ("greedy", "uniform", "layer", "random", "uniform-evict", "budgets-merge", "budgets-evict")


def profile_dirs(root: Path) -> list[Path]:
    found = [p for p in root.iterdir() if (p / "profile.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


@st.cache_data(show_spinner=False)
def load_profile(path: str, mtime: float) -> dict:
    return json.loads((Path(path) / "profile.json").read_text())


@st.cache_data(show_spinner="Planning…")
def start_plan(path: str, mtime: float, start: str, total: int) -> dict:
    """The starting plan's JSON (cached: changing another selector does not re-plan)."""

    profile = load_profile(path, mtime)
    greedy = greedy_plan(profile, total, sinks=profile["sinks"], name=f"greedy-{total}", model=profile["model"])
    plan = greedy if start == "greedy" else baseline(start, greedy, total=total, cap=profile["tokens"] - 1)
    return plan.to_json()


def edit_plan(plan: Plan) -> Plan:
    """Budgets and merge flags as an editable layers x heads table."""
    H = plan.num_kv_heads
    merge = plan.merge or [[True] * H for _ in plan.budgets]
    rows = [{"layer": l} | {f"H{h}": b for h, b in enumerate(plan.budgets[l])}
            | {f"merge H{h}": m for h, m in enumerate(merge[l])} for l in range(plan.num_layers)]
    edited = st.data_editor(rows, key="plan_editor", hide_index=True, disabled=["layer"])
    budgets = [[int(r[f"H{h}"]) for h in range(H)] for r in edited]
    merges = [[bool(r[f"merge H{h}"]) for h in range(H)] for r in edited]
    return Plan(budgets, plan.sinks, plan.recent, merge=merges, name=plan.name, model=plan.model)


def evaluate(plan: Plan, profile: dict, corpus: str, tokens: int, window: int, documents: int, skip: int,
             baselines: list[str]) -> list[dict]:

    loaded = dashboard.cached_model()
    plan.check(loaded.model.config)
    baselines = evaluation_options(plan, baselines, tokens, window)  # the command's checks and messages
    seqs = evaluation_sequences(loaded.tokenizer, {"corpus": corpus}, tokens, documents, skip, profile["text_ids"])
    windows = make_windows(seqs, window, bos_id(loaded.tokenizer))
    plans = [baseline(name, plan, cap=window - 1) for name in baselines] + [plan]
    with dashboard.model_lock(), dashboard.progress("evaluating") as bar:  # the evaluator switches the attention
        progress = starter.counter(len(plans) * len(windows.docs), bar)
        return evaluate_plans(loaded, windows, plans, {"corpus": corpus}, tokens, documents, progress=progress)


def plan_section(path: Path, profile: dict) -> None:
    st.header("Plan")
    heads = len(profile["layers"]) * profile["num_kv_heads"]
    c1, c2 = st.columns(2)
    mean = c1.number_input("total memory: slots per head on average", 5, profile["tokens"] - 1, 128, key="mean_budget")
    start = c2.selectbox("start from", STARTS, key="start")
    total = int(mean) * heads
    plan = Plan.from_text(json.dumps(start_plan(str(path), path.stat().st_mtime, start, total)))
    plan = edit_plan(plan)
    st.caption(f"{plan.total_slots} of {total} slots; budgets {plan.min_budget}..{plan.max_budget}")
    if plan.total_slots > total:
        st.warning(f"the edited plan holds {plan.total_slots} slots, more than the {total} chosen")
    st.plotly_chart(fig_plan_heatmap(plan), key="fig_plan")
    data = plan.to_json() | {"profile": {"dir": str(path), "text_ids": profile["text_ids"]}}
    st.download_button("Export plan (JSON)", json.dumps(data, indent=1), file_name=f"{plan.name}.json",
                       mime="application/json", key="export")

    st.subheader("Evaluate against uniform WeightedKV (and other baselines) at equal memory")
    with st.form("evaluate"):
        baselines = st.multiselect("baselines", BASELINES, default=["uniform"], key="eval_baselines",
                                   help="uniform-evict, budgets-merge and budgets-evict separate the plan's two "
                                        "choices (budgets, merge or evict): see analysis/heads/allocate.py")
        e1, e2, e3, e4, e5 = st.columns(5)
        corpus = e1.selectbox("corpus", list(CORPORA), index=list(CORPORA).index("web"), key="eval_corpus")
        tokens = e2.number_input("tokens", 64, 8192, 2048, step=64, key="eval_tokens")
        window = e3.number_input("window", 8, 4096, 1024, step=8, key="eval_window")
        documents = e4.number_input("documents", 1, 16, 2, key="eval_documents")
        skip = e5.number_input("skip documents", 0, 1000, 0, key="eval_skip")
        go = st.form_submit_button("Evaluate")
    key = (json.dumps(data, sort_keys=True), corpus, int(tokens), int(window), int(documents), int(skip),
           tuple(baselines))
    results = st.session_state.setdefault("head_evaluations", {})
    if go and key not in results:
        results[key] = evaluate(plan, profile, corpus, int(tokens), int(window), int(documents), int(skip),
                                list(baselines))
    if key in results:
        rows = results[key]
        st.dataframe([{"plan": r["plan"], "slots": r["total_slots"], "ppl": round(r["ppl"], 3)}
                      | {d: v for d, v in r["per_document_ppl"].items()} for r in rows],
                 key="evaluation", hide_index=True)
        st.plotly_chart(fig_evaluation({"plan": plan.name, "results": rows}), key="fig_evaluation")


def main() -> None:
    st.title("Which heads to compress")
    root = dashboard.show_runs_root()
    dirs = profile_dirs(root)
    if not dirs:
        st.info(f"No head profiles in {root}/ yet, so this shows the starter profile (256 tokens). Make a real one "
                f"with `python -m experiments.heads profile --corpus books --tokens 1024 --documents 4 "
                f"--out {root}/heads`.")
    paths = {p.name: p for p in dirs} | {starter.PROFILE_LABEL: None}  # the starter: computed once, when chosen
    name = st.selectbox("profile", list(paths), key="profile")
    path = paths[name] or dashboard.starter_dir("profile")
    profile = load_profile(str(path), path.stat().st_mtime)
    st.caption(f"{profile['model']} · {len(profile['rows'])} heads · {profile['sequences']} x {profile['tokens']} "
               f"tokens of {', '.join(profile['text_ids'])} · budgets {profile['budgets']}")
    st.subheader("Profile (click a column to sort)")
    st.dataframe(table_rows(profile), key="table", hide_index=True)

    choices = measures(profile)
    st.subheader("Key rank vs sensitivity")
    c1, c2, c3 = st.columns(3)
    x = c1.selectbox("x", choices, index=choices.index("key_post_rope_rank90"), key="scatter_x")
    y = c2.selectbox("y", choices, index=choices.index("sensitivity"), key="scatter_y")
    colour = c3.selectbox("colour", choices, index=choices.index("merge_minus_evict"), key="scatter_colour")
    st.plotly_chart(fig_scatter(profile, x, y, colour), key="fig_scatter")

    st.subheader("Layer x head heatmap")
    measure = st.selectbox("measure", choices, index=choices.index("sensitivity"), key="heatmap_measure")
    st.plotly_chart(fig_heatmap(profile, measure), key="fig_heatmap")
    plan_section(path, profile)


with dashboard.user_errors():
    main()
