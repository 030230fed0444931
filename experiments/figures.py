"""Regenerate every figure of the toolkit on the embedded default (or on --model gemma3-270m, or any
model --model takes), into one directory. The model is part of each figure's settings: a directory made
with one model is remade, not kept, for another.

    python -m experiments.figures --out figures/            # full size (over an hour on 2 CPU cores:
                                                            # table1 took 32 min, fig4_stream 12 min)
    python -m experiments.figures --quick --out figs-quick  # small sizes: <= 10 minutes on 2 CPU cores
                                                            # (measured: 3 min 53 s, 2 quiet cores)

Figures (names for --only; the list is analysis.figures.pipeline.FIGURES):
  fig1_spectra       Fig. 1, key vs value singular-value spectra, on the first corpus (+ rank heatmaps, RoPE keys)
  fig2_perturbation  Fig. 2, one merge vs one eviction at step 100, output error and attention cosine over
                     the next steps, per layer and KV head (books + web)
  fig3_replay        Fig. 3, the toy example replayed step by step through the real WeightedKV policy
  fig4_stream        Fig. 4, running log-perplexity over one long stream per document, WeightedKV vs its
                     eviction ablation at the first budget, mean ± spread over documents (first corpus)
  merge_vs_evict     teacher-forced output error per layer and KV head, merge minus evict, first budget
  heads              head profile on the first corpus (sensitivity, merge minus evict, key rank) and the
                     greedy per-head plan at the first budget per head on average
  lowrank_bytes      low-rank keys vs token compression at equal cache bytes (1/2, 1/4, 1/8), Pareto front;
                     basis calibrated on the first documents, perplexity on the next ones (first corpus)
  table1             Table I, perplexity of every method on each corpus at each budget, per-document spread
                     (table.md, table.csv, table.json and a figure)
  retrieval          a passkey grid (depths 0/50/100, decode mode) at the smallest budget: full, weightedkv,
                     weightedkv_evict, h2o, streaming_llm; heatmap, accuracy vs budget, fates (experiments.retrieval)
  merge_space        the merge space's named points (weightedkv, weightedkv_similar, keepkv_like, d2o_like,
                     mergingpress_like, asymkv_like, cam), each paired with its own eviction, as table1's sizes
                     (merges.json, space.html); the full space is python -m experiments.merges

Sizes                full (default)                                    --quick
  fig1_spectra       10 sequences x 1024 tokens                        2 x 512
  fig2_perturbation  8 sequences, t0 = 100 + 800 steps                 2, 100 + 200
  fig4_stream        4 documents x 8192 tokens (or the model's fewer)  2 x 768
  merge_vs_evict     8 sequences x 1024 tokens                         2 x 256
  heads              4 documents x 1024 tokens                         1 x 256
  lowrank_bytes      3 + 3 documents x 256 tokens, window 256          1 + 1 x 128
  table1             4 documents x 1024 tokens per corpus, window 1024 1 x 384, window 384 (one window each)
  retrieval          5 trials x 3 depths x 1024 tokens                 1 x 3 x 256
  merge_space        as table1 (9 methods instead of 8)
--sequences N replaces the number of sequences/documents of every figure.

Output: OUT/NAME/ per figure (each figure as NAME.html + NAME.png, its data beside it, and
figure.json with its settings) and OUT/manifest.json listing every figure with the command and
settings behind it. Each figure's directory is renamed into place only when complete. Running the
same command again keeps the figures already there with the same settings and makes the rest, so a
killed run redoes only what is missing (long figures resume inside, per batch, from OUT/.partial).

Exit status: 0 when every figure was made; 1 when some could not be (each is named on stderr, the
others are still made); 2 for bad input (unknown --only name, --out holding something else, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from analysis.errors import UserError
from analysis.figures.pipeline import FIGURE_JSON, FIGURES, FULL, QUICK, STREAM_METHODS, TABLE_METHODS, FigureRun, kept
from analysis.io import atomic_dir, write_json
from analysis.jobs.job import make_jobs
from analysis.text.corpora import CORPORA
from experiments.common import add_model_args, load_model_from_args, new_parser, parse_ints, run_main

MANIFEST = "manifest.json"


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("figures", __doc__)
    add_model_args(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="figures directory (new, empty, or one to resume)")
    parser.add_argument("--corpora", default="books,web,latex,math",
                        help="corpora of Table I; the first one also feeds Fig. 1 and Fig. 4 "
                             "(default: books,web,latex,math)")
    parser.add_argument("--budgets", default="128,256",
                        help="cache sizes m of Table I; Fig. 4 uses the first (default: 128,256)")
    parser.add_argument("--sequences", type=int, default=None,
                        help="sequences/documents per figure and corpus (default: the preset's, see above)")
    parser.add_argument("--only", default=None, metavar="NAME,...", help="make only these figures")
    parser.add_argument("--quick", action="store_true", help="small sizes (see above): <= 10 minutes on 2 CPU cores")
    parser.add_argument("--no-png", action="store_true", help="write HTML only (PNG needs Debian's chromium)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def check_figures_dir(out: Path) -> dict:
    """The manifest of an existing figures directory, {} for a new or empty one; anything else is refused."""

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a figures directory")
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
        except ValueError:
            data = None
        if not isinstance(data, dict) or data.get("kind") != "kvlens-figures":
            raise UserError(f"--out {out} holds a {MANIFEST} that is not a kvlens figures manifest")
        return data
    if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
        raise UserError(f"--out {out} holds other files (no {MANIFEST}): give a new or empty directory, "
                        "or a figures directory to resume")
    return {}


def _selected(only: str | None) -> list[str]:

    if only is None:
        return list(FIGURES)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown or not names:
        raise UserError(f"--only: unknown figure {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(FIGURES)}")
    return [n for n in FIGURES if n in names]


def _check_inputs(run, names: list[str]) -> None:
    """Everything that can be refused before any work (budgets vs windows, corpora)."""

    unknown = [c for c in run.corpora if c not in CORPORA]
    if unknown or not run.corpora:
        raise UserError(f"--corpora: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CORPORA)}")
    if not run.budgets:
        raise UserError("--budgets: give at least one cache size")
    s = run.sizes
    if min(s.spectra_sequences, s.table_documents, s.stream_documents) < 1:
        raise UserError("--sequences must be at least 1")
    if "table1" in names:
        make_jobs(TABLE_METHODS, run.budgets, window=s.table_window)
    if "fig4_stream" in names:
        make_jobs(STREAM_METHODS, run.budgets[:1], window=s.stream_tokens or 8192)


def _write_manifest(out: Path, manifest: dict) -> None:

    write_json(out / MANIFEST, manifest)


def _prepare_partial(partial: Path, settings: dict) -> None:
    """Keep a killed figure's partial results only when they were made with the same settings."""
    marker = partial / "figure-settings.json"
    if partial.exists():
        try:
            same = json.loads(marker.read_text()) == json.loads(json.dumps(settings))
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(settings))


def _figure_command(args, name: str) -> str:
    parts = ["python", "-m", "experiments.figures", "--out", args.out, "--only", name, "--model", args.model,
             "--corpora", args.corpora, "--budgets", args.budgets]
    parts += ["--sequences", str(args.sequences)] if args.sequences is not None else []
    parts += ["--quick"] if args.quick else []
    return shlex.join(parts)


def main(argv=None, *, sizes=None, load=None) -> None:
    """``sizes`` and ``load`` (-> LoadedModel) replace the presets and the model loader (tests only)."""
    args = build_parser().parse_args(argv)
    names = _selected(args.only)
    out = Path(args.out)
    manifest = check_figures_dir(out)
    sizes = sizes or (QUICK if args.quick else FULL)
    if args.sequences is not None:
        n = args.sequences
        sizes = dataclasses.replace(sizes, spectra_sequences=n, table_documents=n, stream_documents=n,
                                    perturb_sequences=n, heads_documents=n)
    run = FigureRun(model=args.model, corpora=[c.strip() for c in args.corpora.split(",") if c.strip()],
                    budgets=parse_ints(args.budgets, "budgets") or [], sizes=sizes, png=not args.no_png,
                    quiet=args.quiet, out=out, load=load or (lambda: load_model_from_args(args)))
    _check_inputs(run, names)

    out.mkdir(parents=True, exist_ok=True)
    for leftover in list(out.glob(".*.tmp-*")) + list(out.glob(".*.old-*")):  # from a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    manifest = {"kind": "kvlens-figures", "command": shlex.join(["python", "-m", "experiments.figures",
                                                                 *(sys.argv[1:] if argv is None else argv)]),
                "figures": manifest.get("figures", {})}
    todo = []
    for name in names:
        settings = FIGURES[name].settings(run)
        if kept(out / name, settings):
            entry = manifest["figures"].setdefault(name, json.loads((out / name / FIGURE_JSON).read_text()))
            entry["status"] = "kept"
        else:
            todo.append((name, settings))
    _write_manifest(out, manifest)
    if any(FIGURES[name].needs_model for name, _ in todo):
        run.loaded()  # a bad --model is bad input: refused before any figure
    bar = tqdm(total=sum(FIGURES[name].units(run) for name, _ in todo), unit="unit", desc="figures",
               disable=args.quiet)
    run.advance = bar.update
    run.note = bar.set_postfix_str
    failed = []
    for name, settings in todo:
        figure = FIGURES[name]
        bar.set_postfix_str(name)
        began = time.perf_counter()
        entry = {"about": figure.about, "command": _figure_command(args, name), "settings": settings}
        _prepare_partial(run.partial(name), settings)
        try:
            with atomic_dir(out / name, overwrite=True) as tmp:
                figure.build(run, tmp)
                write_json(tmp / FIGURE_JSON, {"name": name, "settings": settings, "command": entry["command"]})
                files = sorted(p.name for p in tmp.iterdir() if not p.name.startswith("."))
        except Exception as err:  # noqa: BLE001 - one figure's failure must not stop the others
            failed.append(name)
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            tqdm.write(f"error: figure {name} could not be made: {message}", file=sys.stderr)
            entry |= {"status": "failed", "error": message}
        else:
            shutil.rmtree(run.partial(name), ignore_errors=True)
            entry |= {"status": "made", "files": [f"{name}/{f}" for f in files],
                      "seconds": round(time.perf_counter() - began, 1)}
        manifest["figures"][name] = entry
        _write_manifest(out, manifest)
    bar.close()
    if (out / ".partial").is_dir() and not any((out / ".partial").iterdir()):
        (out / ".partial").rmdir()
    made = [n for n in names if n not in failed]
    states = ", ".join(f"{n} {manifest['figures'][n]['status']}" for n in names)
    print(f"wrote {out}: {len(made)} of {len(names)} figure(s) made or kept ({states})")
    if failed:
        print(f"error: {len(failed)} figure(s) could not be made: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
