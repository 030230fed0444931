"""Attention: one KV head's attention, and what each method does to its cache, token by token.

Source: a capture run under runs/ (``$KVLENS_RUNS`` overrides) or the starter capture (Austen,
computed once on the embedded model). The replay decodes the run's text one token at a time through
the real CompressedCache (analysis.runtime.replay); nothing here simulates a method.
"""

import streamlit as st

from analysis.app import dashboard
from analysis.compress import make_policy, method_names
from analysis.errors import UserError
from analysis.models.loading import builtin_name
from analysis.report.attention import fig_attention_map, fig_average_attention, fig_mixing, fig_replay_kept
from analysis.runtime.replay import attention_window, average_attention, merge_preview, right_neighbour
from analysis.runtime.runs import list_runs, load_run

NEEDED = ("key_post_rope", "value", "attn_received_kv", "attn_count")
REPLAY_METHODS = ["weightedkv", "weightedkv_similar", "weightedkv_evict", "streaming_llm"]
SIMILAR = "weightedkv_similar"  # WeightedKV's selection and weights, the most cosine-similar post-RoPE key as target
MAX_REPLAY = 512  # token-by-token decoding: keep a replay to a minute or so on a CPU


@st.cache_resource(show_spinner="Loading the run…", max_entries=4)
def load_capture(path: str, stamp: float):
    """A capture run, kept in memory (``stamp``: its mtime, so a replaced run is read again)."""

    return load_run(path)


@st.cache_data(show_spinner=False, max_entries=8)
def token_texts(model: str, ids: tuple[int, ...]) -> list[str]:
    tokenizer = dashboard.cached_model(model).tokenizer
    return [tokenizer.decode([i]) for i in ids]


def choose_run():
    st.sidebar.header("Source")
    runs = list_runs(dashboard.show_runs_root())
    chosen = st.sidebar.selectbox("capture run", [dashboard.STARTER_LABEL] + runs, key="run",
                                  format_func=lambda p: p if isinstance(p, str) else p.name,
                                  help="The starter keeps attention maps of its last 64 queries; capture runs "
                                       "made elsewhere usually keep only the per-token statistics.")
    path = dashboard.starter_capture() if chosen == dashboard.STARTER_LABEL else chosen
    capture = load_capture(str(path), path.stat().st_mtime)
    missing = [k for k in NEEDED if f"layers.{capture.layers[0]}.{k}" not in capture.tensors]
    if missing:
        raise UserError(f"run {path.name} lacks {', '.join(missing)}: capture it with the default kinds and statistics")
    return capture


def main() -> None:
    st.title("Attention and the compressed cache, step by step")
    st.caption("ā = a / n: attention a token received, summed over the queries that saw it, divided by their "
               "number. WeightedKV removes the candidate with the lowest ā (sinks and the recent window are "
               "protected), drops its key and merges its value into its right neighbour, weighted by ā.")
    capture = choose_run()
    model = builtin_name(capture.meta.get("model", "default")) or capture.meta["model"]
    token_ids = capture.meta["token_ids"][0]
    tokens = token_texts(model, tuple(token_ids))
    kv_heads = capture.get(capture.layers[0], "value").shape[1]

    sliding = capture.meta.get("sliding_layers") or []
    layers = [l for l in capture.layers if l not in sliding]  # CompressedCache does not compress sliding layers
    if sliding:
        st.caption(f"Layers {', '.join(map(str, sliding))} use a sliding window: the compressed cache leaves them to "
                   "the model's own sliding cache, so only the other layers can be shown here.")
    if not layers:
        st.info("Every captured layer of this run uses a sliding window: nothing here is compressed.")
        return
    c1, c2, c3 = st.columns(3)
    layer = c1.selectbox("layer", layers, index=len(layers) // 2, key="layer")
    head = c2.selectbox("KV head", list(range(kv_heads)), key="head")
    budget = c3.number_input("budget m (slots per KV head)", 8, 128, 32, step=8, key="budget",
                             help="Sets the protected split (4 sinks + m/2 - 4 recent) and the replay's cache size.")
    budget, sinks = int(budget), 4

    st.subheader("Attention over a window")
    window = attention_window(capture, layer, head)
    if window is None:
        st.info("This run kept no attention maps; the starter capture has them for its last 64 queries.")
    else:
        st.plotly_chart(fig_attention_map(window[0], window[1], layer, head, tokens), key="fig_attention_map")

    score = average_attention(capture, layer)[head].tolist()
    weightedkv, similarity = (make_policy(m, budget, sinks=sinks) for m in ("weightedkv", SIMILAR))
    victim, into = merge_preview(capture, layer, weightedkv)[head]
    _, similar = merge_preview(capture, layer, similarity)[head]  # same selection, another target
    st.plotly_chart(fig_average_attention(score, layer, head, victim, into, sinks, weightedkv.recent, tokens,
                                          similar_into=similar), key="fig_average_attention")
    if victim is not None:
        def where(positions):
            return ", ".join(f"**{p}** ({tokens[p]!r}, ā = {score[p]:.4f})" for p in positions) or "nothing"

        st.markdown(f"If this {len(score)}-token cache had to give up one slot, WeightedKV would remove position "
                    f"**{victim}** ({tokens[victim]!r}, ā = {score[victim]:.4f}) and merge its value into "
                    f"{where(into)}, its right neighbour. A similarity merge ({SIMILAR}: the most cosine-similar "
                    f"post-RoPE key) would merge the same token into {where(similar)}.")

    st.subheader("Replay: decoding token by token through the compressed cache")
    r1, r2 = st.columns([3, 1])
    methods = r1.multiselect("methods", method_names(compressing=True, presets=True), default=REPLAY_METHODS,
                             key="methods")
    longest = min(len(token_ids), MAX_REPLAY)
    if longest <= budget:
        st.info(f"The run has {len(token_ids)} tokens, no more than the budget {budget}: nothing to compress.")
        return
    length = r2.number_input("tokens to replay", budget + 1, longest, max(budget + 1, min(64, longest)), step=8,
                             key="length", help="The first tokens of the run's (first) text, decoded one at a time.")
    if not methods:
        st.info("Choose at least one method to replay.")
        return
    replays = {m: dashboard.replay_cached(model, token_ids[: int(length)], m, budget, sinks, int(layer))
               for m in methods}
    step = st.slider("step (token just decoded)", 0, int(length) - 1, int(length) - 1, key="step")
    st.plotly_chart(fig_replay_kept(replays, step, head), key="fig_replay_kept")
    lines = []
    for name, rep in replays.items():
        now = rep.steps[step][head]
        nxt_victim, nxt_into = rep.next_merge(step, head)
        said = f"**{name}**: holds {len(now.positions)}"
        if now.evicted is not None:
            said += f"; removed {now.evicted}" + (f", merged into {', '.join(map(str, now.merged_into))}"
                                                  if now.merged_into else "")
            neighbour = right_neighbour(rep, step, head)
            if now.merged_into and now.merged_into != [neighbour]:  # a target other than the right neighbour
                said += f" (its right neighbour was {neighbour})"
        if nxt_victim is not None:
            said += f"; next step removes {nxt_victim}" + (f" into {', '.join(map(str, nxt_into))}" if nxt_into else "")
        lines.append(said)
    st.markdown("  \n".join(lines))

    mixed = [m for m, rep in replays.items() if rep.mixing is not None]
    if not mixed:
        st.info("Mixtures are not available for these methods.")
        return
    default = mixed.index("weightedkv") if "weightedkv" in mixed else 0
    shown = st.selectbox("value mixtures of", mixed, index=default, key="mixing_method")
    rep = replays[shown]
    st.plotly_chart(fig_mixing(rep, step, head, tokens), key="fig_mixing")
    st.caption("Each row is a held slot; its colours are the weights of the original tokens its value now "
               "averages (a convex mixture for WeightedKV, a sum for CaM), as the cache tracks them "
               "(CompressedCache(track_mixing=T) applies every merge to these weights as to the values).")


with dashboard.user_errors():
    main()
