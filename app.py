"""kvlens dashboard: what is inside a real model's KV cache. Start with ``./run.sh`` (or streamlit run app.py).

This file is the router: the home page (captures) is ``home`` below, every other page is a file in
pages/ (``N_Title.py``; adding a page is adding a file).
"""

import os

# Before anything imports huggingface_hub (through transformers): it reads this once, at import. Nothing
# is downloaded from the hub while the dashboard runs (run.sh exports it too; set HF_HUB_OFFLINE=0 to allow).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import time
from pathlib import Path

import streamlit as st

from analysis.app.dashboard import (
    STARTER_LABEL,
    capture_embedded,
    runs_root,
    show_runs_root,
    starter_capture,
    user_errors,
)
from analysis.report.norms import fig_norms
from analysis.runtime.runs import list_runs, load_run, save_run
from analysis.text.corpora import CORPORA

HOME_TITLE = "kvlens — what is inside the KV cache"


def home() -> None:

    st.title(HOME_TITLE)
    st.caption("Keys, values, queries and attention of a real model on real text. Pages: Spectra (keys are "
               "low-rank, values are not), Generate (compressed cache in generate()), Perplexity (cost of "
               "compression), Attention (what WeightedKV does to one head's cache, step by step).")
    with st.sidebar.form("capture"):
        st.subheader("New capture (embedded SmolLM2-135M)")
        corpus = st.selectbox("corpus", list(CORPORA), key="corpus")
        tokens = st.number_input("tokens", 32, 4096, 256, step=32, key="tokens")
        sequences = st.number_input("sequences", 1, 16, 1, key="sequences")
        name = st.text_input("run name", value="", placeholder=f"{corpus}-{tokens}", key="name")
        start = st.form_submit_button("Capture")

    if start:
        with user_errors():
            capture = capture_embedded(corpus, tokens, sequences)
            out = runs_root() / (name or f"{corpus}-{tokens}-{time.strftime('%H%M%S')}")
            save_run(capture, out)
            st.session_state["run"] = out  # show the new run
            st.success(f"saved {out}")

    root = show_runs_root()
    runs = list_runs(root)
    if not runs:
        st.info(f"No runs in {root}/ yet, so this shows the starter capture. Capture your own from the sidebar, "
                "or run `python -m experiments.capture --corpus books --tokens 1024 --out runs/austen`.")
    with user_errors():
        chosen = st.selectbox("run", runs + [STARTER_LABEL], key="run",
                              format_func=lambda p: p if isinstance(p, str) else p.name)
        capture = load_run(starter_capture() if chosen == STARTER_LABEL else chosen)  # the starter: computed once
        meta = capture.meta
        cols = st.columns(4)
        cols[0].metric("model", meta.get("model", "?"))
        cols[1].metric("sequences × tokens", f"{len(meta.get('text_ids', []))} × {meta.get('tokens')}")
        cols[2].metric("layers", len(meta["layers"]))
        cols[3].metric("KV heads × head dim", f"{meta['config']['num_kv_heads']} × {meta['config']['head_dim']}")
        st.plotly_chart(fig_norms(capture), key="norms")
        with st.expander("metadata"):
            st.json({k: v for k, v in meta.items() if k not in ("token_ids", "positions")})


def pages() -> list:
    found = [st.Page(home, title="Home", url_path="", default=True)]
    for path in sorted((Path(__file__).resolve().parent / "pages").glob("[0-9]*_*.py")):
        found.append(st.Page(str(path), title=path.stem.split("_", 1)[1].replace("_", " ")))
    return found


page = st.navigation(pages())
st.set_page_config(page_title="kvlens — KV cache explorer" if page.title == "Home" else f"{page.title} · kvlens",
                   layout="wide")
page.run()
