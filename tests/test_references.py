"""No stale references: every repository path and dotted name that the README, docs/, docstrings, page
texts and --help quote exists (tests/references.py). The checker is tested on a small synthetic tree: it
must catch a wrong path, a wrong module and a wrong attribute wherever they are written, and pass the
valid ones and the patterns (placeholders)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.references import (
    ROOT,
    Text,
    check_texts,
    command_modules,
    docstring_texts,
    find_names,
    find_paths,
    help_texts,
    markdown_texts,
    page_texts,
    static_texts,
)


def _listing(stale) -> str:
    return f"{len(stale)} stale reference(s):\n" + "\n".join(f"  {s}" for s in stale)


# --- the repository ---------------------------------------------------------------------------------

def test_repository_texts_have_no_stale_references():
    """README, docs/, docstrings and page texts (no subprocess: fast)."""
    texts = static_texts(ROOT)
    assert {t.kind for t in texts} >= {"markdown", "page text"}
    assert any(t.path == "README.md" for t in texts) and any(t.path.startswith("pages/") for t in texts)
    stale = check_texts(texts, ROOT)
    assert not stale, _listing(stale)


@pytest.fixture(scope="module")
def repository_helps():
    return help_texts(ROOT)


@pytest.mark.slow
def test_repository_help_texts_have_no_stale_references(repository_helps):
    texts, failed = repository_helps
    commands = {t.path for t in texts}
    # the commands and their subcommands are all there (a sample: top level, subcommands, library commands)
    for cmd in ("experiments.heads", "experiments.heads profile", "experiments.lowrank cost",
                "experiments.perturbation sweep", "experiments.retrieval", "experiments.bench.compress",
                "analysis.app.starter", "analysis.text.corpora fetch", "tests.outputs.check"):
        assert f"python -m {cmd} --help" in commands, sorted(commands)
    assert "analysis.models.loading" not in command_modules(ROOT)  # no argparse: --help would run it
    stale = failed + check_texts(texts, ROOT)
    assert not stale, _listing(stale)


@pytest.mark.slow
def test_collected_help_is_what_the_command_prints(repository_helps):
    texts, _ = repository_helps
    collected = {t.path: t.text for t in texts}
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="10000")
    argv = ["experiments.heads", "profile", "--help"]
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == collected["python -m " + " ".join(argv)]


# --- the checker, on a synthetic tree ---------------------------------------------------------------

def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return root


CORE = '''
    """Core helpers.

    Written by analysis/core.py, read by analysis.core.Thing.run; patterns: pages/N_Title.py, docs/*.md.
    """
    import os

    from analysis.sub import mod
    from analysis.sub.mod import Base as Renamed

    LIMIT = 3


    def helper():
        """Returns ``analysis.core.LIMIT``."""


    class Thing:
        """A thing with ``analysis.core.Thing.size`` and ``analysis.core.Thing.Inner.deep``."""

        kind: str = "x"

        class Inner:
            deep = 1

        def __init__(self):
            self.size = 1

        def run(self):
            """Same as analysis.core.helper; runs python -m experiments.NAME."""
'''


@pytest.fixture
def tree(tmp_path):
    return _write(tmp_path, {
        "README.md": "See `analysis/core.py`, analysis/sub/ and analysis/sub, `app.py`, ./run.sh and pyproject.toml.\n"
                     "Outputs go to runs/analysis/x.json and results/; ~/.cache/kvlens/analysis/y.py is no path.\n",
        "run.sh": "", "app.py": '"""The app: pages/1_Page.py."""\n', "pyproject.toml": "",
        "docs/notes.md": "# Notes\n\nThe module analysis.sub.mod, the class analysis.sub.mod.Base, "
                         "``analysis.report.{spectra,heads}``, analysis.<name> and experiments/NAME.py.\n",
        "analysis/__init__.py": '"""The package: analysis.core, analysis.helper (re-exported)."""\n'
                                "from analysis.core import helper\n",
        "analysis/core.py": CORE,
        "analysis/sub/__init__.py": "",
        "analysis/sub/mod.py": '"""Submodule."""\nclass Base:\n    """A base."""\n    def go(self):\n        pass\n',
        "experiments/__init__.py": "",
        "pages/1_Page.py": '''
            import streamlit as st

            x = 1
            st.caption("Computed by analysis/core.py (analysis.core.helper).")
            st.info(f"{x} rows; see " "analysis/sub/mod.py")
        ''',
    })


def test_valid_references_and_placeholders_pass(tree):
    texts = markdown_texts(tree) + docstring_texts(tree) + page_texts(tree)
    assert {t.path for t in texts} >= {"README.md", "docs/notes.md", "analysis/core.py", "pages/1_Page.py", "app.py"}
    assert check_texts(texts, tree) == []
    found = {p for t in texts for _, p in find_paths(t.text)}
    assert {"analysis/core.py", "analysis/sub/", "analysis/sub", "app.py", "run.sh", "pyproject.toml",
            "pages/1_Page.py", "analysis/sub/mod.py"} <= found
    assert not any(p.startswith(("runs", "results")) or "NAME" in p or "*" in p or "N_Title" in p for p in found)
    names = {n for t in texts for _, n in find_names(t.text)}
    assert {"analysis.core.Thing.run", "analysis.core.Thing.size", "analysis.core.Thing.Inner.deep",
            "analysis.sub.mod.Base", "analysis.helper"} <= names
    assert not any("NAME" in n or n == "analysis.report" for n in names)


def test_placeholders_are_not_references():
    text = ("experiments/NAME.py pages/N_Title.py docs/*.md analysis/{a,b}.py tests/<name>.py analysis/... "
            "analysis/… $OUT/analysis/x.py python -m experiments.NAME analysis.report.{a,b} analysis.<m> analysis.*")
    assert find_paths(text) == []
    assert find_names(text) == []


def test_trailing_punctuation_is_not_part_of_a_reference():
    text = "see analysis/core.py. Or `analysis/sub/`, (analysis/sub/mod.py); analysis.core.helper()."
    assert [p for _, p in find_paths(text)] == ["analysis/core.py", "analysis/sub/", "analysis/sub/mod.py"]
    assert [n for _, n in find_names(text)] == ["analysis.core.helper"]


def test_a_wrong_path_in_a_docstring_is_caught(tree):
    _write(tree, {"analysis/extra.py": '"""Fine."""\n\n\ndef f():\n    """Rule in\n    analysis/head_plans.py."""\n'})
    stale = check_texts(docstring_texts(tree), tree)
    assert [(s.where, s.reference) for s in stale] == [("analysis/extra.py:6 (docstring of def f)",
                                                       "analysis/head_plans.py")]
    assert "no such file" in stale[0].why


def test_a_moved_file_gets_a_hint(tree):
    stale = check_texts([Text("README.md", "see analysis/mod.py and analysis/sub.py", 1, "markdown")], tree)
    assert [s.reference for s in stale] == ["analysis/mod.py", "analysis/sub.py"]
    assert "analysis/sub/mod.py" in stale[0].why and "analysis/sub/ is a package" in stale[1].why


def test_a_wrong_folder_and_a_wrong_entry_are_caught(tree):
    text = "in analysis/nothing/ and pages/9_Gone.py, tests/ too, and analysis/core.py/ is no folder"
    stale = check_texts([Text("docs/x.md", text, 1, "markdown")], tree)
    assert [s.reference for s in stale] == ["analysis/nothing/", "pages/9_Gone.py", "tests/", "analysis/core.py/"]


def test_a_wrong_module_in_markdown_is_caught(tree):
    _write(tree, {"docs/more/deep.md": "# Deep\n\nSee\n``analysis.models.convert`` and analysis.sub.gone.f.\n"})
    stale = check_texts(markdown_texts(tree), tree)
    assert [(s.where, s.reference) for s in stale] == [
        ("docs/more/deep.md:4 (markdown)", "analysis.models.convert"),
        ("docs/more/deep.md:4 (markdown)", "analysis.sub.gone.f"),
    ]
    assert stale[0].why == "no module analysis.models"
    assert stale[1].why == "no module analysis.sub.gone"


def test_a_wrong_attribute_in_a_page_text_is_caught(tree):
    _write(tree, {"pages/2_More.py": '''
        import streamlit as st

        st.markdown("analysis.core.nothing, analysis.core.Thing.nope, analysis.core.Thing.Inner.no "
                    "and analysis.sub.mod.Base.go (fine)")
        st.caption(f"{1} and {2}: analysis.perturbation.layers")
    '''})
    stale = check_texts(page_texts(tree), tree)
    assert [(s.where, s.reference) for s in stale] == [
        ("pages/2_More.py:3 (page text)", "analysis.core.nothing"),
        ("pages/2_More.py:3 (page text)", "analysis.core.Thing.nope"),
        ("pages/2_More.py:3 (page text)", "analysis.core.Thing.Inner.no"),
        ("pages/2_More.py:5 (page text)", "analysis.perturbation.layers"),
    ]
    assert stale[0].why == "analysis.core has no 'nothing'"
    assert stale[1].why == "analysis.core.Thing has no 'nope'"
    assert stale[3].why == "no module analysis.perturbation"


def test_a_moved_name_gets_a_hint_and_reexports_are_followed(tree):
    texts = [Text("README.md", "analysis.sub.helper, analysis.core.Renamed.go, analysis.core.Renamed.gone, "
                               "analysis.core.mod.Base, analysis.core.os.path.whatever", 1, "markdown")]
    stale = check_texts(texts, tree)
    assert [s.reference for s in stale] == ["analysis.sub.helper", "analysis.core.Renamed.gone"]
    assert "defined in: analysis.core.helper" in stale[0].why
    assert stale[1].why == "analysis.sub.mod.Base has no 'gone'"


def test_wrong_references_in_a_help_text_are_caught(tree):
    _write(tree, {"experiments/cmd.py": '"""A command."""\n'})
    help_text = "usage: python -m experiments.cmd [-h]\n\nWrites runs/x; see analysis/gone.py and analysis.core.gone.\n"
    stale = check_texts([Text("python -m experiments.cmd --help", help_text, None, "--help")], tree)
    assert [(s.where, s.reference) for s in stale] == [
        ("python -m experiments.cmd --help (--help)", "analysis/gone.py"),
        ("python -m experiments.cmd --help (--help)", "analysis.core.gone"),
    ]


COMMAND = '''
    """A command; its docstring is the --help: see analysis/core.py."""
    import argparse


    def main(argv=None):
        parser = argparse.ArgumentParser(prog="python -m experiments.cmd", description=__doc__)
        sub = parser.add_subparsers(dest="what", metavar="MODE", required=True)
        sub.add_parser("one", description="reads analysis/gone.py")
        two = sub.add_parser("two", aliases=["2"], help="the second")
        deeper = two.add_subparsers(dest="how")
        deeper.add_parser("deep", description="see experiments.cmd.nothing")
        parser.parse_args(argv)
        raise SystemExit("ran past parse_args")


    if __name__ == "__main__":
        main()
'''


@pytest.mark.slow
def test_help_texts_of_commands_and_subcommands_are_collected_and_checked(tree):
    _write(tree, {
        "experiments/cmd.py": COMMAND,
        # a main without argparse is not a command: running it for --help would do its work
        "experiments/worker.py": 'def main(argv):\n    open("ran", "w").close()\n\n\nif __name__ == "__main__":\n'
                                 '    main(None)\n',
        "experiments/broken.py": 'def main(argv):\n    raise RuntimeError("no parser")\n    parser.parse_args(argv)\n'
                                 '\n\nif __name__ == "__main__":\n    main(None)\n',
        "experiments/helpers.py": '"""Not a command: no main."""\n',
    })
    assert command_modules(tree) == ["experiments.broken", "experiments.cmd"]
    texts, failed = help_texts(tree)
    assert not (tree / "ran").exists()
    assert {t.path for t in texts} == {"python -m experiments.cmd --help", "python -m experiments.cmd one --help",
                                       "python -m experiments.cmd two --help",
                                       "python -m experiments.cmd two deep --help"}
    assert [(s.reference, s.why) for s in failed] == [("experiments.broken", "RuntimeError: no parser")]
    stale = check_texts(texts, tree)
    assert [(s.where, s.reference) for s in stale] == [
        ("python -m experiments.cmd one --help (--help)", "analysis/gone.py"),
        ("python -m experiments.cmd two deep --help (--help)", "experiments.cmd.nothing"),
    ]
    assert stale[1].why == "experiments.cmd has no 'nothing'"
