"""Generate: run ``model.generate`` on the embedded model with a compressed KV cache, beside the full cache.

Shows both continuations, the slots each layer holds afterwards and which original positions a
layer / KV head kept. One unpadded prompt per run (CompressedCache needs equal-length rows).
"""

import streamlit as st

from analysis.app.dashboard import cached_model, generate_text, user_errors
from analysis.compress import compresses, method_names
from analysis.errors import UserError
from analysis.report.generate import fig_kept_positions, fig_occupancy
from analysis.text.corpora import load_documents, token_sequences

INSTRUCTION = "Write three sentences about why a language model caches keys and values."
CHOICES = method_names(presets=True)  # the registered methods, then the merge-space presets


@st.cache_data(show_spinner=False)
def default_prompt(tokens: int = 300) -> str:
    """The opening ``tokens`` tokens of an Austen novel, or a short instruction without the corpus."""

    try:
        docs = load_documents(corpus="books")
        docs = [d for d in docs if "/austen/" in d.id] or docs
        tokenizer = cached_model().tokenizer
        (_, ids), = token_sequences(tokenizer, docs, tokens, 1)
        return tokenizer.decode(ids)
    except UserError:
        return INSTRUCTION


@st.cache_data(show_spinner="Generating…", max_entries=32)
def generate(prompt: str, method: str, budget: int | None, sinks: int, recent: int | None, new: int,
             sample: bool, temperature: float, seed: int, plan_json: str | None = None) -> dict:
    return generate_text(prompt, method, budget, sinks, recent, new, sample, temperature, seed, plan_json)


def show_text(col, title: str, result: dict) -> None:
    col.subheader(title)
    col.caption(f"{result['new_tokens']} new tokens in {result['seconds']:.1f} s "
                f"({result['new_tokens'] / max(result['seconds'], 1e-9):.1f} tokens/s)")
    quoted = "\n".join(f"> {line}" for line in result["text"].splitlines())  # every line inside the quote
    col.markdown(quoted if result["text"].strip() else "*(no text: end of sequence at once)*")


def main() -> None:
    st.title("Generate with a compressed cache")
    st.caption("The embedded model continues the prompt twice: through a cache held to the budget by the chosen "
               "method, and with the full cache. Keys are cached post-RoPE at their original positions.")
    with st.sidebar:
        method = st.selectbox("method", CHOICES, index=CHOICES.index("weightedkv"), key="method")
        budget = st.slider("budget (slots per layer and KV head)", 16, 512, 64, key="budget")
        sinks = st.number_input("sinks", 0, 64, 4, key="sinks")
        recent = st.number_input("recent window", 0, 512, value=None, placeholder="budget/2 - sinks", key="recent")
        new = st.number_input("max new tokens", 1, 512, 32, key="new")
        sample = st.radio("decoding", ["greedy", "sampling"], key="decoding", horizontal=True) == "sampling"
        temperature = st.slider("temperature", 0.05, 2.0, 0.7, disabled=not sample, key="temperature")
        seed = st.number_input("seed", 0, 2**31 - 1, 0, key="seed")
        upload = st.file_uploader("per-head plan (JSON, replaces the budget)", type="json", key="plan")
    prompt = st.text_area("prompt", value=default_prompt(), height=200, key="prompt")
    plan_json = upload.getvalue().decode("utf-8", "replace") if upload is not None else None
    settings = (prompt, method, int(budget), int(sinks), None if recent is None else int(recent), int(new),
                sample, float(temperature) if sample else 1.0, int(seed), plan_json)
    if st.button("Generate", type="primary", key="generate"):
        st.session_state["generated"] = settings
    if "generated" not in st.session_state:  # first open: an example with the default settings
        st.session_state["generated"] = settings
        st.info("An example with the default settings. Choose a method and budget in the sidebar, then press "
                "Generate; the prompt must be longer than the budget for anything to be compressed.")
    chosen = st.session_state["generated"]
    if chosen != settings:
        st.caption("Showing the previous generation; press Generate to apply the new settings.")
    prompt, method, budget = chosen[:3]
    result = generate(*chosen)
    full = generate(prompt, "full", None, 4, None, *chosen[5:9])  # cached per prompt and decoding settings
    if chosen[9] is not None:
        st.caption(f"Per-head budgets from the uploaded plan. Cache memory: "
                   f"{result['memory']['logical_bytes'] / 2**20:.2f} MB logical (sum of the budgets), "
                   f"{result['memory']['physical_bytes'] / 2**20:.2f} MB physical (the slots allocated).")
    if result["prompt_tokens"] <= budget and compresses(method):
        st.warning(f"The prompt has {result['prompt_tokens']} tokens, no more than the budget {budget}: "
                   "only the generated tokens can push the cache past it.")
    left, right = st.columns(2)
    show_text(left, f"{method} (budget {budget})", result)
    show_text(right, "full cache", full)

    st.plotly_chart(fig_occupancy({method: result["occupancy"], "full": full["occupancy"]},
                                  budget if compresses(method) else None), key="fig_occupancy")
    layers = len(result["kept"])
    c1, c2 = st.columns(2)
    layer = c1.slider("layer", 0, layers - 1, layers // 2, key="layer")
    kv_heads = len(result["kept"][layer])
    head = c2.selectbox("KV head", ["all"] + list(range(kv_heads)), key="head")
    heads = None if head == "all" else [int(head)]
    st.plotly_chart(fig_kept_positions(result["kept"][layer], result["seen"][layer], layer, result["sinks"],
                                       result["recent"], result["prompt_tokens"], heads), key="fig_kept")


with user_errors():
    main()
