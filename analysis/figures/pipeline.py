"""Every figure of the toolkit from one place (``python -m experiments.figures``).

A figure is one line in ``FIGURES``: its name -> ``Figure(builder, settings, about, units, needs_model)``.
``builder(run, directory)`` writes the figure's files (HTML + PNG, data beside them) into a fresh
directory; ``settings(run)`` is the dict of everything its output depends on. The runner builds each
figure in a temporary directory renamed to ``OUT/NAME`` when complete, and records the settings in
``OUT/NAME/figure.json``: a figure already there with the same settings is kept (a killed run redoes
only what is missing). Long figures also keep per-(method, window) partial results in
``OUT/.partial/NAME`` so a kill inside them loses at most one batch.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from analysis.compress import MERGE_VS_EVICT, PolicyOptions, method_names
from analysis.jobs.job import make_jobs
from analysis.perturbation.toy import toy_replay
from analysis.heads.allocate import greedy_plan
from analysis.heads.profile import profile_sequences
from analysis.io import write_json
from analysis.lowrank.calibrate import calibrate, held_out
from analysis.lowrank.compare import goal, pareto, parse_key_specs, plan_configs, run_compare
from analysis.merges.space import ablation
from analysis.merges.study import run_space
from analysis.runtime.batching import Batching
from analysis.perplexity.stream import check_stream_length, run_stream
from analysis.perplexity.table1 import check_finite, run_table, table_csv, table_markdown, window_count
from analysis.perplexity.windows import make_windows
from analysis.perturbation.study import Settings, run_study
from analysis.perturbation.texts import study_sequences, study_source
from analysis.report.export import write_figure
from analysis.report.fig3 import fig_fig3_replay
from analysis.report.heads import fig_plan_heatmap, profile_figures
from analysis.report.lowrank import fig_ppl_vs_bytes
from analysis.report.merges import fig_space
from analysis.report.retrieval import write_retrieval
from analysis.report.save import save_study, write_stream
from analysis.report.spectra import standard_figures
from analysis.report.table1 import fig_table1
from analysis.retrieval.grid import build_prompts, retrieval_settings, run_grid
from analysis.runtime.capture import capture_sequences
from analysis.spectra.compute import compute_spectra, summary_sentence
from analysis.text.corpora import load_documents, token_sequences

FIGURE_JSON = "figure.json"
TABLE_METHODS = method_names()  # Table I: every registered method, in the registry's order


@dataclass(frozen=True)
class Sizes:
    """How much work each figure does; ``QUICK`` and ``FULL`` are the command's two presets."""
    spectra_sequences: int
    spectra_tokens: int
    table_documents: int
    table_tokens: int
    table_window: int
    stream_documents: int
    stream_tokens: int | None  # None: as many as the model has positions
    perturb_sequences: int = 8  # half books, half web
    fig2_future: int = 800  # steps after the one compression at t0 = 100
    sweep_tokens: int = 1024
    heads_documents: int = 4  # books documents profiled per head
    heads_tokens: int = 1024
    lowrank_documents: int = 3  # calibration documents, and as many held-out ones evaluated
    lowrank_tokens: int = 256  # per document; also the window
    lowrank_fractions: tuple[float, ...] = (0.5, 0.25, 0.125)  # of the full cache's bytes
    retrieval_tokens: int = 1024  # the passkey grid: one length, depths 0/50/100, the smallest budget
    retrieval_trials: int = 5


FULL = Sizes(spectra_sequences=10, spectra_tokens=1024, table_documents=4, table_tokens=1024, table_window=1024,
             stream_documents=4, stream_tokens=None)


QUICK = Sizes(spectra_sequences=2, spectra_tokens=512, table_documents=1, table_tokens=384, table_window=384,
              stream_documents=2, stream_tokens=768, perturb_sequences=2, fig2_future=200, sweep_tokens=256,
              heads_documents=1, heads_tokens=256, lowrank_documents=1, lowrank_tokens=128,
              retrieval_tokens=256, retrieval_trials=1)


@dataclass
class FigureRun:
    """What every builder may read: the options, the sizes, the model (loaded once) and the progress bar."""
    model: str = "default"
    corpora: list[str] = field(default_factory=lambda: ["books", "web", "latex", "math"])
    budgets: list[int] = field(default_factory=lambda: [128, 256])
    sizes: Sizes = FULL
    png: bool = True
    quiet: bool = False
    out: Path = Path(".")
    load: Callable[[], object] | None = None  # -> LoadedModel
    advance: Callable[[int], None] = lambda n: None  # progress, in the units of ``Figure.units``
    note: Callable[[str], None] = lambda text: None  # a live detail beside the progress bar
    _loaded: object = None

    def loaded(self):
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded

    def partial(self, name: str) -> Path:
        return self.out / ".partial" / name


@dataclass(frozen=True)
class Figure:
    build: Callable[[FigureRun, Path], None]
    settings: Callable[[FigureRun], dict]
    about: str
    units: Callable[[FigureRun], int] = lambda run: 1
    needs_model: bool = True


@contextmanager
def ticking(run: FigureRun, name: str, every: int = 16):
    """Show the model forwards done inside a long figure (its units arrive only per finished batch)."""
    count = 0

    def hook(module, args, output):
        nonlocal count
        count += 1
        if count % every == 0:
            run.note(f"{name}: {count} model steps")

    handle = run.loaded().model.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- builders -------------------------------------------------------------------------------------------
def build_fig1_spectra(run: FigureRun, out: Path) -> None:

    loaded, s = run.loaded(), run.sizes
    sequences = token_sequences(loaded.tokenizer, load_documents(corpus=run.corpora[0]), s.spectra_tokens,
                                s.spectra_sequences)
    capture = capture_sequences(loaded, sequences, kinds=("key_pre_rope", "key_post_rope", "value"), progress=False,
                                on_progress=lambda f: None)
    result = compute_spectra(capture, kinds=("key_pre_rope", "key_post_rope", "value"))
    write_json(out / "spectra.json", result.to_json() | {"summary_sentence": summary_sentence(result)})
    for stem, fig in standard_figures(result).items():
        write_figure(fig, out, stem, png=run.png)
    run.advance(1)


def build_fig3_replay(run: FigureRun, out: Path) -> None:

    steps = toy_replay()
    write_json(out / "fig3.json", [asdict(s) for s in steps])
    write_figure(fig_fig3_replay(steps), out, "fig3_replay", png=run.png)
    run.advance(1)


def _perturbation(run: FigureRun, out: Path, settings) -> None:
    """A merging-effects study (``analysis.perturbation.study``) on the command's books + web mix."""

    loaded = run.loaded()
    seqs = study_sequences(loaded.tokenizer, settings.tokens, run.sizes.perturb_sequences, mode=settings.mode)
    summary, tensors = run_study(loaded, seqs, settings, source=study_source())
    study = save_study(out / "study", summary, tensors, png=run.png)  # JSON, CSV, curves stay in study/
    for figure in sorted((study / "figures").iterdir()):  # the figures sit beside every other figure's
        figure.replace(out / figure.name)
    (study / "figures").rmdir()
    run.advance(1)


def build_fig2_perturbation(run: FigureRun, out: Path) -> None:

    _perturbation(run, out, Settings("fig2", 100 + run.sizes.fig2_future, future=run.sizes.fig2_future))


def build_merge_vs_evict(run: FigureRun, out: Path) -> None:

    _perturbation(run, out, Settings("sweep", run.sizes.sweep_tokens, budgets=[min(run.budgets)]))


def build_heads(run: FigureRun, out: Path) -> None:
    """Head profile (analysis/heads/profile.py) on the first corpus, its figures, and the greedy plan at min(budgets)x."""

    loaded, s = run.loaded(), run.sizes
    budgets = [b for b in (32, 64, 128, 256, 512) if b < s.heads_tokens]
    sequences = token_sequences(loaded.tokenizer, load_documents(corpus=run.corpora[0]), s.heads_tokens,
                                s.heads_documents)
    profile = profile_sequences(loaded, sequences, {"corpus": run.corpora[0]}, budgets=budgets)
    write_json(out / "profile.json", profile)
    for stem, fig in profile_figures(profile).items():
        write_figure(fig, out, stem, png=run.png)
    heads = len(profile["layers"]) * profile["num_kv_heads"]
    plan = greedy_plan(profile, min(run.budgets) * heads, sinks=profile["sinks"], name=f"greedy-{min(run.budgets)}x",
                       model=profile["model"])
    write_json(out / "plan.json", plan.to_json())
    write_figure(fig_plan_heatmap(plan), out, "plan_budgets", png=run.png)
    run.advance(1)


LOWRANK = {"methods": ["streaming_llm", "h2o", "tova"], "merge": ["weightedkv"],
           "combine": ["weightedkv", "tova"], "key_ranks": "0.95,0.99"}


def build_lowrank_bytes(run: FigureRun, out: Path) -> None:
    """Low-rank keys vs token compression at equal bytes: basis on the first documents, evaluated on the next."""
    loaded, s = run.loaded(), run.sizes
    docs = load_documents(corpus=run.corpora[0])
    basis = calibrate(loaded, docs, {"corpus": run.corpora[0]}, s.lowrank_tokens, s.lowrank_documents, progress=False)
    basis.save(out / "basis")
    windows = make_windows(token_sequences(loaded.tokenizer, held_out(basis, docs), s.lowrank_tokens,
                                           s.lowrank_documents), s.lowrank_tokens)
    fractions = list(s.lowrank_fractions)
    configs = plan_configs(fractions, basis.head_dim, windows.size,
                           element_size=next(loaded.model.parameters()).element_size(),
                           token_methods=LOWRANK["methods"], merge_methods=LOWRANK["merge"],
                           combine_methods=LOWRANK["combine"], key_specs=parse_key_specs(LOWRANK["key_ranks"], basis))
    with ticking(run, "lowrank_bytes"):
        rows = run_compare(loaded, windows, basis, configs, fractions=fractions,
                           batching=Batching(partial=run.partial("lowrank_bytes")))
    compare = {"model": loaded.model_id, "calibration": basis.calibration,
               "documents": list(dict.fromkeys(windows.docs)), "tokens": s.lowrank_tokens, "window": windows.size,
               "fractions": fractions, "rows": rows, "pareto": pareto(rows),
               "goal": [goal(rows, f) for f in fractions]}
    write_json(out / "compare.json", compare)
    write_figure(fig_ppl_vs_bytes(compare), out, "ppl_vs_bytes", png=run.png)
    run.advance(1)


STREAM_METHODS = list(MERGE_VS_EVICT)


STREAM_CAP = 8192  # full-size Fig. 4: the model's positions, at most this many tokens


def _stream_tokens(run: FigureRun) -> int | None:
    return run.sizes.stream_tokens


def build_fig4_stream(run: FigureRun, out: Path) -> None:

    loaded = run.loaded()
    limit = loaded.summary()["max_positions"]
    tokens = run.sizes.stream_tokens or min(limit or STREAM_CAP, STREAM_CAP)  # Gemma 3 has 32k positions
    check_stream_length(tokens, limit)
    sequences = token_sequences(loaded.tokenizer, load_documents(corpus=run.corpora[0]), tokens,
                                run.sizes.stream_documents)
    with ticking(run, "fig4_stream"):
        summary, tensors = run_stream(loaded, sequences, make_jobs(STREAM_METHODS, run.budgets[:1]),
                                      source={"corpus": run.corpora[0]},
                                      batching=Batching(partial=run.partial("fig4_stream"), progress=run.advance))
    write_stream(out, summary, tensors, png=run.png)


def build_table1(run: FigureRun, out: Path) -> None:

    s = run.sizes
    with ticking(run, "table1"):
        table = run_table(run.loaded(), run.corpora, make_jobs(TABLE_METHODS, run.budgets, window=s.table_window),
                          tokens=s.table_tokens, documents=s.table_documents, window=s.table_window,
                          batching=Batching(partial=run.partial("table1"), progress=run.advance))
    check_finite(table)
    write_json(out / "table.json", table)
    for name, text in (("table.md", table_markdown(table)), ("table.csv", table_csv(table))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)
    write_figure(fig_table1(table), out, "table1", png=run.png)


def _table_units(run: FigureRun) -> int:

    jobs = 1 + (len(TABLE_METHODS) - 1) * len(run.budgets)
    return jobs * len(run.corpora) * run.sizes.table_documents * window_count(run.sizes.table_tokens,
                                                                             run.sizes.table_window)


RETRIEVAL_METHODS = ["full", *MERGE_VS_EVICT, "h2o", "streaming_llm"]


def _retrieval_settings(run: FigureRun):
    return retrieval_settings("passkey", "decode", [run.sizes.retrieval_tokens], [0, 50, 100], [min(run.budgets)],
                              RETRIEVAL_METHODS, run.sizes.retrieval_trials)


def build_retrieval(run: FigureRun, out: Path) -> None:
    """A passkey grid in decode mode (analysis/retrieval): heatmap, accuracy vs budget, fates."""
    settings = _retrieval_settings(run)
    prompts = build_prompts(run.loaded().tokenizer, settings)
    with ticking(run, "retrieval"):
        result = run_grid(run.loaded(), settings, prompts,
                          Batching(partial=run.partial("retrieval"), progress=run.advance))
    write_retrieval(out, result, png=run.png)


# The merge space's named points (the factorial and the cascade are experiments.merges'), each paired with its eviction.
MERGE_FIGURE_VARIANTS = ["weightedkv", "weightedkv_similar", "keepkv_like", "d2o_like", "mergingpress_like",
                         "asymkv_like", "cam"]


def build_merge_space(run: FigureRun, out: Path) -> None:

    s = run.sizes
    with ticking(run, "merge_space"):
        _, rows = run_space(run.loaded(), run.corpora, MERGE_FIGURE_VARIANTS, run.budgets, tokens=s.table_tokens,
                            documents=s.table_documents, window=s.table_window, options=PolicyOptions(),
                            batching=Batching(partial=run.partial("merge_space"), progress=run.advance), split="all")
    result = {"model": run.loaded().model_id, "budgets": run.budgets, "corpora": run.corpora, "rows": rows,
              "spread": "population std"}
    write_json(out / "merges.json", result)
    write_figure(fig_space(result), out, "space", png=run.png)


def _merge_units(run: FigureRun) -> int:
    jobs = len(set(MERGE_FIGURE_VARIANTS) | {ablation(v) for v in MERGE_FIGURE_VARIANTS}) * len(run.budgets)
    return jobs * len(run.corpora) * run.sizes.table_documents * window_count(run.sizes.table_tokens,
                                                                             run.sizes.table_window)


# --- the registry: one entry per figure (how to build it, the settings it records, what it shows) ---------
def _fig1_settings(r: FigureRun) -> dict:
    return {"model": r.model, "corpus": r.corpora[0], "sequences": r.sizes.spectra_sequences,
            "tokens": r.sizes.spectra_tokens}


def _fig4_settings(r: FigureRun) -> dict:
    return {"model": r.model, "corpus": r.corpora[0], "documents": r.sizes.stream_documents,
            "tokens": r.sizes.stream_tokens or f"model positions (at most {STREAM_CAP})", "budget": r.budgets[0],
            "methods": STREAM_METHODS}


def _fig2_settings(r: FigureRun) -> dict:
    return {"model": r.model, "sequences": r.sizes.perturb_sequences, "t0": 100, "future": r.sizes.fig2_future,
            "corpora": "books+web"}


def _merge_vs_evict_settings(r: FigureRun) -> dict:
    return {"model": r.model, "sequences": r.sizes.perturb_sequences, "tokens": r.sizes.sweep_tokens,
            "budget": min(r.budgets), "corpora": "books+web"}


def _heads_settings(r: FigureRun) -> dict:
    return {"model": r.model, "corpus": r.corpora[0], "documents": r.sizes.heads_documents,
            "tokens": r.sizes.heads_tokens, "plan": f"greedy {min(r.budgets)}x"}


def _lowrank_settings(r: FigureRun) -> dict:
    return {"model": r.model, "corpus": r.corpora[0], "documents": r.sizes.lowrank_documents,
            "tokens": r.sizes.lowrank_tokens, "fractions": list(r.sizes.lowrank_fractions)} | LOWRANK


def _table1_settings(r: FigureRun) -> dict:
    return {"model": r.model, "corpora": r.corpora, "budgets": r.budgets, "documents": r.sizes.table_documents,
            "tokens": r.sizes.table_tokens, "window": r.sizes.table_window}


def _retrieval_figure_settings(r: FigureRun) -> dict:
    return {"model": r.model, **_retrieval_settings(r).record()}


FIGURES: dict[str, Figure] = {
    "fig1_spectra": Figure(build_fig1_spectra, _fig1_settings,
                           "Fig. 1: key vs value singular-value spectra (+ rank heatmaps, RoPE keys)"),
    "fig3_replay": Figure(build_fig3_replay, lambda r: {"policy": "WeightedKV(budget=4, sinks=0, recent=0)"},
                          "Fig. 3: the toy example replayed step by step through WeightedKV.compress",
                          needs_model=False),
    "fig4_stream": Figure(build_fig4_stream, _fig4_settings,
                          "Fig. 4: running log-perplexity over one long stream, WeightedKV vs eviction",
                          units=lambda r: len(STREAM_METHODS) * r.sizes.stream_documents),
    "fig2_perturbation": Figure(build_fig2_perturbation, _fig2_settings,
                                "Fig. 2: one merge vs one eviction at step 100, attention cosine and output error "
                                "over the next steps"),
    "merge_vs_evict": Figure(build_merge_vs_evict, _merge_vs_evict_settings,
                             "Teacher-forced output error per layer and KV head: WeightedKV merge minus eviction"),
    "heads": Figure(build_heads, _heads_settings,
                    "Which heads to compress: head profile (sensitivity, merge minus evict, key rank) and a greedy "
                    "budget plan"),
    "lowrank_bytes": Figure(build_lowrank_bytes, _lowrank_settings,
                            "Low-rank keys vs token compression: perplexity against cache bytes, Pareto front"),
    "table1": Figure(build_table1, _table1_settings,
                     "Table I: perplexity of every method per corpus at each budget, per-document spread",
                     units=_table_units),
    "retrieval": Figure(build_retrieval, _retrieval_figure_settings,
                        "Retrieval: a passkey far back, found or lost under each method (decode mode), and where "
                        "its tokens went (kept / merged / gone)",
                        units=lambda r: len(_retrieval_settings(r).jobs) * 3 * r.sizes.retrieval_trials),
    "merge_space": Figure(build_merge_space, lambda r: _table1_settings(r) | {"variants": MERGE_FIGURE_VARIANTS},
                          "The merge space's named points, each paired with its own eviction: wins and mean "
                          "perplexity difference per corpus and budget", units=_merge_units),
}


def kept(directory: Path, settings: dict) -> bool:
    """True when ``directory`` holds a finished figure made with exactly these settings."""
    marker = directory / FIGURE_JSON
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("settings") == json.loads(json.dumps(settings))
    except (OSError, ValueError):
        return False
