"""The starter set: what the dashboard shows on first open, before the user has made a run.

A 256-token Austen capture with the attention maps of its last 64 queries (home, Spectra and
Attention pages) and a small perplexity sweep (Perplexity page), both on the embedded model. They
are computed once into ``$KVLENS_STARTER`` (default ``~/.cache/kvlens/starter``), by set-up or by
the first page that needs them, and read from disk afterwards.

    python -m analysis.starter [--quiet]    # compute whatever is missing (./run.sh setup runs this)
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from analysis.paths import cache_dir

CAPTURE = dict(corpus="books", tokens=256, maps_window=(192, 256))
SWEEP = dict(corpus="books", tokens=256, window=128, budgets=[32],
             methods=["full", "weightedkv", "weightedkv_evict", "streaming_llm"])
LABEL = "starter: Austen, 256 tokens (embedded model)"


def root() -> Path:
    return Path(os.environ.get("KVLENS_STARTER") or cache_dir() / "starter")


def capture_dir() -> Path:
    return root() / "capture-{corpus}-{tokens}-maps{maps_window[0]}".format(**CAPTURE)


def sweep_dir() -> Path:
    return root() / "ppl-{corpus}-{tokens}-w{window}-m{budgets[0]}".format(**SWEEP)


def documents(corpus: str):
    """The corpus' documents; for ``books``, the Austen novels first (the text the paper's examples use)."""
    from analysis.corpora import load_documents

    docs = load_documents(corpus=corpus)
    return [d for d in docs if "/austen/" in d.id] + [d for d in docs if "/austen/" not in d.id]


def capture(loaded, corpus: str, tokens: int, sequences: int = 1, maps_window=None, on_progress=None):
    """Capture ``sequences`` x ``tokens`` of ``corpus`` (Austen first) with ``loaded``."""
    from analysis.capture import capture_sequences
    from analysis.corpora import token_sequences

    seqs = token_sequences(loaded.tokenizer, documents(corpus), int(tokens), int(sequences))
    result = capture_sequences(loaded, seqs, progress=False, on_progress=on_progress, maps_window=maps_window)
    result.meta["source"] = {"corpus": corpus}
    return result


def sweep(loaded, corpus: str, tokens: int, window: int, methods: list[str], budgets: list[int],
          on_progress=None) -> tuple[dict, dict]:
    """A perplexity sweep over one document of ``corpus``; ``on_progress(fraction)`` as windows finish."""
    from analysis.corpora import token_sequences
    from analysis.perplexity import make_windows
    from analysis.sweep import run_sweep, sweep_jobs

    jobs = sweep_jobs(methods, budgets, window)  # bad settings fail before any work
    windows = make_windows(token_sequences(loaded.tokenizer, documents(corpus), tokens, 1), window)
    total, done = len(jobs) * len(windows.docs), [0]

    def progress(n: int) -> None:
        done[0] += n
        if on_progress:
            on_progress(done[0] / total)

    return run_sweep(loaded, windows, methods, budgets, source={"corpus": corpus}, tokens=tokens, documents=1,
                     progress=progress)


def make_capture(loaded, on_progress=None) -> Path:
    """The starter capture run, computed unless it is already on disk."""
    from analysis.runs import save_run

    out = capture_dir()
    if not (out / "meta.json").is_file():
        save_run(capture(loaded, **CAPTURE, on_progress=on_progress), out, overwrite=True)
    return out


def make_sweep(loaded, on_progress=None) -> Path:
    """The starter perplexity sweep, computed unless it is already on disk."""
    from analysis.sweep import save_sweep

    out, s = sweep_dir(), SWEEP
    if not (out / "perplexity.json").is_file():
        summary, tensors = sweep(loaded, s["corpus"], s["tokens"], s["window"], s["methods"], s["budgets"],
                                 on_progress)
        save_sweep(out, summary, tensors, overwrite=True, png=False)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.starter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    missing = [d for d, f in ((capture_dir(), "meta.json"), (sweep_dir(), "perplexity.json")) if not (d / f).is_file()]
    if not missing:
        return 0
    from tqdm.auto import tqdm

    from analysis.models import load_model

    loaded = load_model("default")
    for name, make in (("starter capture", make_capture), ("starter perplexity sweep", make_sweep)):
        with tqdm(total=100, desc=name, unit="%", disable=args.quiet) as bar:
            make(loaded, lambda fraction: bar.update(round(100 * fraction) - bar.n))
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
