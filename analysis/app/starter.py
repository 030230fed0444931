"""The starter set: what the dashboard shows on first open, before the user has made a run.

On the embedded model: a 256-token Austen capture with the attention maps of its last 64 queries
(home, Spectra and Attention pages), a small perplexity sweep (Perplexity page), a Fig. 2
perturbation study on one Austen and one Python-docs sequence (Perturbation page), a head
profile of 256 Austen tokens (Heads page) and a small passkey grid (Retrieval page). Each is
computed once into ``$KVLENS_STARTER`` (default ``~/.cache/kvlens/starter``) and read from disk
afterwards: by set-up, in the foreground, or by the background worker that the dashboard's first
page needing a missing part starts (``analysis.app.background``: per-part locks and progress files,
so no part is ever computed twice or by two processes at once).

    python -m analysis.app.starter [--quiet]    # compute whatever is missing (./run.sh setup runs this)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm.auto import tqdm

from analysis.heads.profile import profile_sequences
from analysis.models.loading import LoadedModel, load_model
from analysis.paths import cache_dir
from analysis.perplexity.settings import sweep_settings
from analysis.perplexity.sweep import run_sweep
from analysis.perplexity.windows import make_windows
from analysis.perturbation.study import Settings, run_study
from analysis.perturbation.texts import study_sequences, study_source
from analysis.report.retrieval import save_retrieval
from analysis.report.save import save_profile, save_study, save_sweep
from analysis.retrieval.grid import build_prompts, grid_units, retrieval_settings, run_grid
from analysis.runtime.batching import Batching
from analysis.runtime.capture_text import capture_documents
from analysis.runtime.runs import save_run
from analysis.text.corpora import austen_first, token_sequences

CAPTURE = dict(corpus="books", tokens=256, maps_window=(192, 256))


SWEEP = dict(corpus="books", tokens=256, window=128, budgets=[32],
             methods=["full", "weightedkv", "weightedkv_evict", "streaming_llm"])


FIG2 = dict(sequences=2, t0=100, future=100)  # one sequence of t0 + future tokens from books, one from web


PROFILE = dict(corpus="books", tokens=256, budgets=[32, 64, 128])


# 3 depths x 3 compressing methods x 1 trial at 256 tokens: about 40 s on 2 quiet cores
RETRIEVAL = dict(task="passkey", mode="decode", lengths=[256], depths=[0, 50, 100], budget=[32],
                 methods=["full", "weightedkv", "weightedkv_evict", "streaming_llm"], trials=1)


LABEL = "starter: Austen, 256 tokens (embedded model)"


FIG2_LABEL = "starter: Fig. 2 on Austen + Python docs, t0 = 100, 100 steps (embedded model)"


PROFILE_LABEL = "starter: heads of 256 Austen tokens (embedded model)"


RETRIEVAL_LABEL = "starter: passkey at 256 tokens, budget 32 (embedded model)"


def root() -> Path:
    return Path(os.environ.get("KVLENS_STARTER") or cache_dir() / "starter")


def capture_dir() -> Path:
    return root() / "capture-{corpus}-{tokens}-maps{maps_window[0]}".format(**CAPTURE)


def sweep_dir() -> Path:
    return root() / "ppl-{corpus}-{tokens}-w{window}-m{budgets[0]}".format(**SWEEP)


def fig2_dir() -> Path:
    return root() / "fig2-books-web-t{t0}-n{future}".format(**FIG2)


def profile_dir() -> Path:
    return root() / "heads-{corpus}-{tokens}".format(**PROFILE)


def retrieval_dir() -> Path:
    return root() / "retrieval-{task}-{lengths[0]}-m{budget[0]}".format(**RETRIEVAL)


def counter(total: int, on_progress=None):
    """A ``progress(n)`` callback (units done) that reports ``on_progress(fraction)``."""
    done = [0]

    def progress(n: int) -> None:
        done[0] += n
        if on_progress:
            on_progress(done[0] / total)

    return progress


documents = austen_first  # the starter's text: Austen first, as the paper's examples


def capture(loaded: LoadedModel, corpus: str, tokens: int, sequences: int = 1, maps_window=None, on_progress=None):
    """Capture ``sequences`` x ``tokens`` of ``corpus`` (Austen first) with ``loaded``."""

    return capture_documents(loaded, documents(corpus), {"corpus": corpus}, tokens, sequences, progress=False,
                             on_progress=on_progress, maps_window=maps_window)


def sweep(loaded: LoadedModel, corpus: str, tokens: int, window: int, methods: list[str], budgets: list[int],
          on_progress=None) -> tuple[dict, dict]:
    """A perplexity sweep over one document of ``corpus``; ``on_progress(fraction)`` as windows finish."""

    settings = sweep_settings(methods, budgets, tokens, window)  # the command's checks, first
    windows = make_windows(token_sequences(loaded.tokenizer, documents(corpus), tokens, 1), window)
    progress = counter(len(settings.jobs) * len(windows.docs), on_progress)
    return run_sweep(loaded, windows, settings.jobs, source={"corpus": corpus}, tokens=tokens, documents=1,
                     batching=Batching(progress=progress))


def make_capture(loaded: LoadedModel, on_progress=None) -> Path:
    """The starter capture run, computed unless it is already on disk."""

    out = capture_dir()
    if not (out / "meta.json").is_file():
        save_run(capture(loaded, **CAPTURE, on_progress=on_progress), out, overwrite=True)
    return out


def make_sweep(loaded: LoadedModel, on_progress=None) -> Path:
    """The starter perplexity sweep, computed unless it is already on disk."""

    out, s = sweep_dir(), SWEEP
    if not (out / "perplexity.json").is_file():
        summary, tensors = sweep(loaded, s["corpus"], s["tokens"], s["window"], s["methods"], s["budgets"],
                                 on_progress)
        save_sweep(out, summary, tensors, overwrite=True, png=False)
    return out


def make_fig2(loaded, on_progress=None) -> Path:
    """The starter Fig. 2 study (every layer and KV head), computed unless it is already on disk."""

    out, s = fig2_dir(), FIG2
    if not (out / "perturbation.json").is_file():
        # the command's `fig2 --sequences 2 --t0 100 --future 100`: its settings and its books + web mix
        settings = Settings.from_options("fig2", methods="weightedkv,weightedkv_evict", sequences=s["sequences"],
                                         t0=s["t0"], future=s["future"])
        seqs = study_sequences(loaded.tokenizer, settings.tokens, s["sequences"], mode="fig2", load=documents)
        summary, tensors = run_study(loaded, seqs, settings, progress=counter(len(seqs), on_progress),
                                     source=study_source())
        save_study(out, summary, tensors, overwrite=True, png=False)
    return out


def make_profile(loaded: LoadedModel, on_progress=None) -> Path:
    """The starter head profile (every layer and KV head), computed unless it is already on disk."""

    out, s = profile_dir(), PROFILE
    if not (out / "profile.json").is_file():
        seqs = token_sequences(loaded.tokenizer, documents(s["corpus"]), s["tokens"], 1)
        steps = 2 * loaded.summary()["num_layers"]
        result = profile_sequences(loaded, seqs, {"corpus": s["corpus"]}, budgets=s["budgets"],
                                   progress=counter(steps, on_progress))
        save_profile(out, result, overwrite=True, figures=False)  # the page draws its own figures
    return out


def retrieval(loaded: LoadedModel, settings, docs=None, on_progress=None) -> dict:
    """A retrieval grid (``analysis.retrieval.grid``) with ``loaded``; ``on_progress(fraction)`` per batch."""
    prompts = build_prompts(loaded.tokenizer, settings, docs)
    progress = counter(len(grid_units(settings, prompts)), on_progress)
    return run_grid(loaded, settings, prompts, Batching(progress=progress))


def make_retrieval(loaded: LoadedModel, on_progress=None) -> Path:
    """The starter passkey grid, computed unless it is already on disk."""
    out = retrieval_dir()
    if not (out / "retrieval.json").is_file():
        save_retrieval(out, retrieval(loaded, retrieval_settings(**RETRIEVAL), on_progress=on_progress),
                       overwrite=True, png=False)
    return out


# (name, directory, the file that marks it done, maker); set-up and the pages go through this table
PARTS = {
    "capture": ("starter capture", capture_dir, "meta.json", make_capture),
    "sweep": ("starter perplexity sweep", sweep_dir, "perplexity.json", make_sweep),
    "fig2": ("starter Fig. 2 study", fig2_dir, "perturbation.json", make_fig2),
    "profile": ("starter head profile", profile_dir, "profile.json", make_profile),
    "retrieval": ("starter passkey grid", retrieval_dir, "retrieval.json", make_retrieval),
}


def is_made(part: str) -> bool:
    _, folder, marker, _ = PARTS[part]
    return (folder() / marker).is_file()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.app.starter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    missing = [p for p in PARTS if not is_made(p)]
    if not missing:
        return 0
    from analysis.app import background  # it imports this module

    loaded = []

    def load():  # only when a part is computed here, not when another process made it meanwhile
        if not loaded:
            loaded.append(load_model("default"))
        return loaded[0]

    for part in missing:
        name = PARTS[part][0]
        if background.status(part)["state"] == "running":
            name += " (another process is computing it: waiting)"
        with tqdm(total=100, desc=name, unit="%", disable=args.quiet) as bar:
            background.make_part(part, load, lambda fraction: bar.update(round(100 * fraction) - bar.n))
            bar.update(100 - bar.n)
    return 0


if __name__ == "__main__":
    import sys

    from analysis.errors import UserError

    try:
        sys.exit(main())
    except UserError as err:  # e.g. corpora not fetched: one line, exit code 2, nothing written
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
