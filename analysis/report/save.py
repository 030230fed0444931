"""The writers of result directories: a study returns its results, and these save them with their figures.

Each directory is built in a hidden temp directory and renamed into place (``analysis.io.atomic_dir``):
a perplexity sweep (perplexity.json, nll.safetensors, table.csv/md, figures), a stream (stream.json,
nll.safetensors, the running log-perplexity figure), a perturbation study (perturbation.json/csv,
curves.safetensors, figures/) and a head profile.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from analysis.io import atomic_dir, write_json
from analysis.perturbation.study import RESULTS, rows_csv
from analysis.report.export import write_figure
from analysis.report.heads import profile_figures
from analysis.report.perplexity import fig_ppl_vs_budget, fig_running_log_ppl, table_rows
from analysis.report.perturbation import figures
from analysis.report.stream import fig_stream_running


def save_sweep(out: Path, summary: dict, tensors: dict[str, Tensor], overwrite: bool = False,
               png: bool = True) -> Path:
    """Write a sweep's directory atomically: perplexity.json, nll.safetensors, table.csv/md, figures."""


    rows = table_rows(summary["results"])
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / "perplexity.json", summary)
        save_file(tensors, str(tmp / "nll.safetensors"))
        header = list(rows[0])
        buffer = io.StringIO()  # csv quotes a merge point's commas (merge:target=similar,cap=2)
        csv.writer(buffer, lineterminator="\n").writerows([header] + [[r[h] for h in header] for r in rows])
        (tmp / "table.csv").write_text(buffer.getvalue())
        md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
        (tmp / "table.md").write_text("\n".join(md) + "\n")
        write_figure(fig_ppl_vs_budget(summary), tmp, "ppl_vs_budget", png=png)
        write_figure(fig_running_log_ppl(summary), tmp, "running_log_ppl", png=png)
    return Path(out)


def write_stream(directory: Path, summary: dict, tensors: dict[str, Tensor], png: bool = True) -> list[Path]:
    """stream.json, nll.safetensors and the running_log_ppl figure, each file written atomically."""


    directory = Path(directory)
    write_json(directory / "stream.json", summary)
    tmp = directory / ".nll.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(directory / "nll.safetensors")
    return [directory / "stream.json", directory / "nll.safetensors",
            *write_figure(fig_stream_running(summary), directory, "running_log_ppl", png=png)]


def save_stream(out: Path, summary: dict, tensors: dict[str, Tensor], overwrite: bool = False,
                png: bool = True) -> Path:
    """Write ``write_stream``'s files into ``out`` as one directory, atomically."""

    with atomic_dir(out, overwrite) as tmp:
        write_stream(tmp, summary, tensors, png=png)
    return Path(out)


def save_study(out: str | Path, summary: dict, tensors: dict, overwrite: bool = False, png: bool = True) -> Path:
    """Write the study atomically: JSON, CSV, curves and every figure (HTML, and PNG unless ``png=False``)."""


    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / RESULTS, summary)
        (tmp / "perturbation.csv").write_text(rows_csv(summary["results"]))
        save_file(tensors, str(tmp / "curves.safetensors"))
        for stem, fig in figures(summary).items():
            write_figure(fig, tmp / "figures", stem, png=png)
    return Path(out)


def save_profile(out: str | Path, result: dict, overwrite: bool = False, png: bool = True,
                 figures: bool = True) -> Path:
    """Write a head profile atomically: profile.json and (unless ``figures=False``) its figures."""
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / "profile.json", result)
        if figures:
            for stem, fig in profile_figures(result).items():
                write_figure(fig, tmp, stem, png=png)
    return Path(out)
