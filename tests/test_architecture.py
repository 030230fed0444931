"""The edges stay thin: pages never import the commands, and every command fails bad options in one line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from analysis.compress import method_names
from analysis.errors import UserError
from analysis.options import parse_ints, parse_names
from analysis.perplexity.settings import sweep_settings
from analysis.perturbation.study import Settings
from analysis.perturbation.texts import split_count, study_source
from experiments import capture, heads, perturbation
from experiments.bench import compress as bench_compress

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_FILES = sorted((ROOT / "pages").glob("*.py")) + [ROOT / "app.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, by its full dotted name (relative imports are not used here)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_files_never_import_the_commands(path):
    bad = sorted(m for m in imported_modules(path) if m == "experiments" or m.startswith("experiments."))
    assert not bad, f"{path.name} imports {bad}: the pages call the library, not the command layer"


@pytest.mark.parametrize("main, argv", [
    (capture.main, ["--tokens", "x", "--out", "o"]),
    (capture.main, ["--no-such-option"]),
    (perturbation.main, ["fig2", "--t0", "x", "--out", "o"]),
    (heads.main, ["profile", "--tokens", "x", "--out", "o"]),  # a subcommand's parser is one-line too
    (bench_compress.main, ["throughput", "--windows", "15"]),  # the windows are --batch
])
def test_a_bad_option_is_one_error_line_and_exit_2(main, argv, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "--help)" in lines[0]


def test_option_values_parse_as_the_commands_spell_them():
    assert parse_ints("0,5,10-12", "layers") == [0, 5, 10, 11, 12] and parse_ints(None, "layers") is None
    assert parse_names(" a, b,,c ") == ["a", "b", "c"] == parse_names(["a ", "", "b", "c"])
    with pytest.raises(UserError, match="--budget expects integers"):
        parse_ints("12,x", "budget")


def test_perturbation_settings_from_options_match_the_mode():
    fig2 = Settings.from_options("fig2", methods="weightedkv,weightedkv_evict", t0=100, future=100, budget="64",
                                 steps="7", tokens=5)
    assert (fig2.tokens, fig2.budgets, fig2.steps, fig2.future) == (200, [], [100], 100)
    sweep = Settings.from_options("sweep", tokens=256, budget="64,128", methods="weightedkv", t0=50, future=9)
    assert (sweep.budgets, sweep.t0, sweep.future) == ([64, 128], 100, 0)
    for kwargs, message in [(dict(mode="fig2", t0=1, future=5), "--t0 >= 2"),
                            (dict(mode="sweep", tokens=64, budget="32", methods=[]), "at least one method"),
                            (dict(mode="sweep", tokens=64, budget="4", methods="weightedkv"), "sinks"),
                            (dict(mode="ideal", tokens=64, future=8, steps=None), "--steps")]:
        with pytest.raises(UserError, match=message):
            Settings.from_options(**kwargs)


def test_sweep_settings_check_what_the_command_checks():
    s = sweep_settings(None, "16,24", 72, 48)
    assert s.methods == method_names(compressing=True, in_paper=True)  # the default: the paper's methods
    assert s.budgets == [16, 24] and s.plan is None and len(s.jobs) == 12
    assert sweep_settings(["full", "h2o"], [16], 72, 48).budgets == [16]
    for args, message in [((["h2o"], "16", 32, 48), "shorter than --window"), (([], "16", 72, 48), "one method"),
                          ((None, "1x", 72, 48), "--budget expects")]:
        with pytest.raises(UserError, match=message):
            sweep_settings(*args)


def test_the_mix_splits_between_books_and_web():
    assert split_count(3, 2) == [2, 1] and split_count(1, 2) == [1, 0]
    assert study_source() == {"corpora": ["books", "web"]} and study_source("math") == {"corpus": "math"}
    assert study_source("math", "f.txt") == {"text": "f.txt"}
