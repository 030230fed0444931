"""Stale references: repository paths and dotted names quoted in the texts people read.

The texts: README.md and docs/**/*.md; the docstrings of every module, class and function under
analysis/, experiments/, pages/ and app.py; every string constant of the pages (pages/*.py, app.py:
captions, info boxes, markdown, f-string parts); the docstrings and strings of the tests (a child
process's code is a string); the --help of every command and subcommand. The
references: paths that start at a source entry of the repository (``analysis/app/dashboard.py``,
``pages/6_Heads.py``, ``experiments/``) and dotted names under ``analysis``, ``experiments`` and ``tests``
(``analysis.jobs.plan.Plan``). A path must exist under the root; a dotted name must name a module
there, followed by attributes its source defines (read with ``ast``: nothing is imported, except by
the --help collection, which imports each command in a subprocess). Written outputs (``runs/...``,
``results/...``) are not repository paths and are not checked.

Pure functions, no pytest: texts in, ``Stale(where, reference, why)`` out. tests/test_references.py
runs them on the repository and on small synthetic trees.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent

# The repository's source entries: a path that starts with one of them is a repository path.
FOLDERS = ("analysis", "experiments", "pages", "tests", "docs", ".ci")
FILES = ("app.py", "run.sh", "pyproject.toml", "requirements.txt")
# Where docstrings are read, which files' string constants are page texts, where commands are found.
CODE = ("analysis", "experiments", "pages", "app.py")
PAGES = ("pages", "app.py")
COMMANDS = ("analysis", "experiments", "tests")
PACKAGES = ("analysis", "experiments", "tests")

# A path with one of these in it is a pattern (pages/N_Title.py, docs/*.md, experiments/NAME.py), not a path.
PATH_PLACEHOLDERS = ("NAME", "N_Title", "*", "{", "}", "<", ">", "...", "…", "$", "%")
# A dotted name with one of these as a part is a pattern (python -m experiments.NAME).
NAME_PLACEHOLDERS = frozenset({"NAME", "N_Title", "MODULE"})

_PATH_CHARS = r"[A-Za-z0-9_./*{}<>…$%-]"
_PATH_RE = re.compile(
    r"(?<![\w./-])(?:\./)?(?:(?:" + "|".join(re.escape(f) for f in FOLDERS) + r")/" + _PATH_CHARS + "*"
    r"|(?:" + "|".join(re.escape(f) for f in FILES) + r")(?![\w-]|\.\w))"
)
_NAME_RE = re.compile(r"(?<![\w./-])(?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_PLACEHOLDER_AFTER = re.compile(r"\.(?:[{<*]|\.\.|…)")  # analysis.report.{a,b}, analysis.<module>, analysis.*


class Stale(NamedTuple):
    where: str  # file:line (kind), or the command whose --help says it
    reference: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reference}: {self.why}"


@dataclass(frozen=True)
class Text:
    """A text to check: ``path`` a file relative to the root (or a command line), ``line`` where it starts."""

    path: str
    text: str
    line: int | None = 1
    kind: str = ""
    source: str = ""  # the source lines from ``line`` on, where the text is not the source (implicit concatenation)

    def where(self, offset: int, reference: str = "") -> str:
        if self.line is None:
            return f"{self.path} ({self.kind})" if self.kind else self.path
        line = self.line + self.text.count("\n", 0, offset)
        lines = self.source.splitlines()
        if reference and len(lines) > line - self.line and reference not in lines[line - self.line]:
            line = next((self.line + i for i, s in enumerate(lines) if i >= line - self.line and reference in s), line)
        return f"{self.path}:{line} ({self.kind})" if self.kind else f"{self.path}:{line}"


# --- collecting the texts ---------------------------------------------------------------------------

def _files(root: Path, entries, suffix: str) -> list[Path]:
    out = []
    for entry in entries:
        p = root / entry
        if p.is_file() and p.name.endswith(suffix):
            out.append(p)
        elif p.is_dir():
            out.extend(f for f in sorted(p.rglob(f"*{suffix}")) if "__pycache__" not in f.parts)
    return out


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def markdown_texts(root: Path = ROOT) -> list[Text]:
    """README.md and every docs/**/*.md, whole."""
    files = [root / "README.md"] if (root / "README.md").is_file() else []
    files += sorted((root / "docs").rglob("*.md")) if (root / "docs").is_dir() else []
    return [Text(_rel(root, f), f.read_text(encoding="utf-8"), 1, "markdown") for f in files]


def _docstring_nodes(tree: ast.Module):
    """(owner name, the docstring's Constant node) for the module and every class and function in it."""
    owners = [("module", tree)]
    owners += [(f"{'class' if isinstance(n, ast.ClassDef) else 'def'} {n.name}", n) for n in ast.walk(tree)
               if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for owner, node in owners:
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            yield owner, body[0].value


def docstring_texts(root: Path = ROOT, entries=CODE) -> list[Text]:
    """The module docstring and every class, function and method docstring of each .py under ``entries``."""
    texts = []
    for f in _files(root, entries, ".py"):
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        texts += [Text(_rel(root, f), node.value, node.lineno, f"docstring of {owner}")
                  for owner, node in _docstring_nodes(tree)]
    return texts


def page_texts(root: Path = ROOT, entries=PAGES) -> list[Text]:
    """Every string constant of the pages (f-string parts too), docstrings left to docstring_texts."""
    texts = []
    for f in _files(root, entries, ".py"):
        code = f.read_text(encoding="utf-8")
        tree, lines = ast.parse(code, filename=str(f)), code.splitlines()
        docs = {id(node) for _, node in _docstring_nodes(tree)}
        texts += [Text(_rel(root, f), n.value, n.lineno, "page text", "\n".join(lines[n.lineno - 1:n.end_lineno]))
                  for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value and id(n) not in docs]
    return texts


_PARSE_CALLS = ("parse_args", "parse_known", "parse_intermixed")


def command_modules(root: Path = ROOT, entries=COMMANDS) -> list[str]:
    """Modules that are commands: a top-level ``main(argv)`` that calls ``.parse_args`` (or a sibling), and
    an ``if __name__ == "__main__"`` block."""
    mods = []
    for f in _files(root, entries, ".py"):
        tree = ast.parse(f.read_text(encoding="utf-8"), filename=str(f))
        mains = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main" and n.args.args]
        guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        parses = any(isinstance(c, ast.Attribute) and c.attr.startswith(_PARSE_CALLS)
                     for m in mains for c in ast.walk(m))
        if mains and guarded and parses:
            parts = f.relative_to(root).with_suffix("").parts
            mods.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return mods


class _Parser(BaseException):
    def __init__(self, parser):
        super().__init__("parser")
        self.parser = parser


def _helps_of(parser, words: tuple[str, ...], module: str, out: dict[str, str]) -> None:
    import argparse

    out[" ".join(("python -m", module, *words, "--help"))] = parser.format_help()
    seen = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases share a parser
                    seen.add(id(sub))
                    _helps_of(sub, (*words, name), module, out)


def help_json(modules: list[str]) -> dict:
    """In this process: each command's parser as ``main`` builds it (stopped before it parses anything),
    its --help and every subcommand's. Returns {"helps": {command line: text}, "errors": {module: why}}."""
    import argparse

    helps, errors = {}, {}

    def stop(self, *args, **kwargs):
        raise _Parser(self)

    original = argparse.ArgumentParser.parse_known_args
    argparse.ArgumentParser.parse_known_args = stop
    try:
        for module in modules:
            try:
                importlib.import_module(module).main([])
            except _Parser as got:
                _helps_of(got.parser, (), module, helps)
            except BaseException as err:  # noqa: B036 - a command that exits or fails is reported, not raised
                errors[module] = f"{type(err).__name__}: {err}"
            else:
                errors[module] = "main(argv) returned without parsing its arguments"
    finally:
        argparse.ArgumentParser.parse_known_args = original
    return {"helps": helps, "errors": errors}


def _help_worker(root: Path, modules: list[str], timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="10000", PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--help-json", str(root), *modules],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=root)
    if proc.returncode != 0:
        return {"helps": {}, "errors": {m: f"help collection failed: {proc.stderr.strip()[-2000:]}" for m in modules}}
    return json.loads(proc.stdout)


def help_texts(root: Path = ROOT, modules: list[str] | None = None, workers: int = 2,
               timeout: float = 300) -> tuple[list[Text], list[Stale]]:
    """The --help of every command and subcommand, as ``python -m MODULE [SUB ...] --help`` prints it (with a
    wide terminal, so nothing is wrapped). Commands are imported in ``workers`` subprocesses run at once,
    each importing its share once (a subprocess per --help would import torch 28 times). Returns the texts
    and, for a command whose --help could not be had, a Stale entry."""
    modules = command_modules(root) if modules is None else modules
    shares = [modules[i::workers] for i in range(workers) if modules[i::workers]]
    with ThreadPoolExecutor(max(1, len(shares))) as pool:
        results = list(pool.map(lambda share: _help_worker(root, share, timeout), shares))
    texts, stale = [], []
    for result in results:
        texts += [Text(cmd, text, None, "--help") for cmd, text in result["helps"].items()]
        stale += [Stale(f"python -m {m} --help", m, why) for m, why in result["errors"].items()]
    return sorted(texts, key=lambda t: t.path), stale


# --- finding the references -------------------------------------------------------------------------

def find_paths(text: str) -> list[tuple[int, str]]:
    """(offset, path) of each repository path in ``text``; patterns (placeholders) left out."""
    found = []
    for m in _PATH_RE.finditer(text):
        if any(p in m.group(0) for p in PATH_PLACEHOLDERS):
            continue
        path = m.group(0).rstrip(".-").removeprefix("./")
        found.append((m.start(), path))
    return found


def find_names(text: str) -> list[tuple[int, str]]:
    """(offset, dotted name) of each ``analysis.…``, ``experiments.…``, ``tests.…`` name in ``text``."""
    found = []
    for m in _NAME_RE.finditer(text):
        name = m.group(0)
        if NAME_PLACEHOLDERS.intersection(name.split(".")) or _PLACEHOLDER_AFTER.match(text, m.end()):
            continue
        found.append((m.start(), name))
    return found


# --- checking them ------------------------------------------------------------------------------------

class Checker:
    """Resolves paths and dotted names against the tree at ``root``; the sources it parses are cached."""

    def __init__(self, root: Path = ROOT):
        self.root = Path(root)
        self._trees: dict[Path, ast.Module | None] = {}
        self._basenames: dict[str, list[str]] | None = None

    # paths
    def path_problem(self, path: str) -> str | None:
        p = self.root / path
        if path.endswith("/") and p.is_dir() or not path.endswith("/") and p.exists():
            return None
        if path.endswith("/"):
            return "no such folder" + (" (it is a file)" if p.is_file() else "")
        hints = []
        if p.suffix == ".py" and p.with_suffix("").is_dir():
            hints.append(f"{_rel(self.root, p.with_suffix(''))}/ is a package")
        same = [f for f in self.basenames().get(p.name, []) if f != path][:3]
        if same:
            hints.append(f"same name: {', '.join(same)}")
        return "no such file or folder" + (f" ({'; '.join(hints)})" if hints else "")

    def basenames(self) -> dict[str, list[str]]:
        if self._basenames is None:
            self._basenames = {}
            for f in _files(self.root, FOLDERS, ""):
                if f.is_file() and "__pycache__" not in f.parts:
                    self._basenames.setdefault(f.name, []).append(_rel(self.root, f))
        return self._basenames

    # dotted names
    def module_file(self, parts) -> Path | None:
        """The source of module ``parts`` under the root: NAME.py, NAME/__init__.py, or a folder (namespace)."""
        base = self.root.joinpath(*parts)
        for f in (base.with_suffix(".py"), base / "__init__.py"):
            if f.is_file():
                return f
        return base if base.is_dir() else None

    def tree(self, file: Path) -> ast.Module | None:
        if file not in self._trees:
            self._trees[file] = ast.parse(file.read_text(encoding="utf-8")) if file.is_file() else None
        return self._trees[file]

    def name_problem(self, name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            file = self.module_file(parts[:i])
            if file is not None:
                break
        else:
            return f"no module {parts[0]}"
        if i == len(parts):
            return None
        return self.attribute_problem(file, ".".join(parts[:i]), parts[i:], depth=0)

    def attribute_problem(self, file: Path, module: str, attrs: list[str], depth: int) -> str | None:
        """Why ``module.attrs`` does not exist, or None; ``file`` is the module's source."""
        tree = self.tree(file)
        if tree is None:
            return f"no module {module}.{attrs[0]}"
        defs = _top_level(tree.body)
        first, rest = attrs[0], attrs[1:]
        if first not in defs:
            if "__getattr__" in defs:
                return None
            missing = f"no module {module}.{first}" if file.name == "__init__.py" else f"{module} has no {first!r}"
            return missing + self._defined_elsewhere(first, module)
        node = defs[first]
        if not rest:
            return None
        if isinstance(node, ast.ClassDef):
            return self._class_problem(node, f"{module}.{first}", rest)
        if isinstance(node, ast.ImportFrom) and depth < 8:  # a re-export: look where it comes from
            source = _import_source(node, module, file.name == "__init__.py")
            alias = next(a for a in node.names if (a.asname or a.name) == first)
            parts = source.split(".")
            target = self.module_file(parts + [alias.name])
            if target is not None:  # from package import submodule
                return self.attribute_problem(target, f"{source}.{alias.name}", rest, depth + 1) if rest else None
            target = self.module_file(parts) if parts[0] in PACKAGES else None
            if target is not None:
                return self.attribute_problem(target, source, [alias.name, *rest], depth + 1)
        return None  # a variable, a function, an outside import: its attributes are not checked

    def _class_problem(self, cls: ast.ClassDef, qualname: str, attrs: list[str]) -> str | None:
        members = _top_level(cls.body)
        for fn in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):  # self.x = ... in a method: an instance attribute
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
                for t in targets:
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        members.setdefault(t.attr, t)
        first = attrs[0]
        if first not in members:
            if cls.bases or cls.keywords:  # inherited from a base we do not follow: only a project base is read
                bases = [ast.unparse(b) for b in cls.bases]
                if any(b not in ("object", "NamedTuple", "Exception") for b in bases):
                    return None
            return f"{qualname} has no {first!r}"
        node = members[first]
        if isinstance(node, ast.ClassDef) and attrs[1:]:
            return self._class_problem(node, f"{qualname}.{first}", attrs[1:])
        return None

    def _defined_elsewhere(self, name: str, module: str) -> str:
        """A hint: the project modules that define ``name`` at top level (for a moved function)."""
        hits = []
        for f in _files(self.root, PACKAGES, ".py"):
            tree = self.tree(f)
            node = _top_level(tree.body).get(name) if tree else None
            if node is not None and not isinstance(node, (ast.ImportFrom, ast.Import)):
                parts = f.relative_to(self.root).with_suffix("").parts
                hits.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts) + f".{name}")
        for f in _files(self.root, PACKAGES, ""):  # or a module of that name
            if f.is_dir() and f.name == name or f.is_file() and f.name == f"{name}.py":
                hits.append(".".join(f.relative_to(self.root).with_suffix("").parts))
        hits = [h for h in dict.fromkeys(hits) if not h.startswith(f"{module}.{name}")][:3]
        return f" (defined in: {', '.join(hits)})" if hits else ""

    # texts
    def check(self, texts: list[Text]) -> list[Stale]:
        stale = []
        for t in texts:
            for offset, path in find_paths(t.text):
                why = self.path_problem(path)
                if why:
                    stale.append(Stale(t.where(offset, path), path, why))
            for offset, name in find_names(t.text):
                why = self.name_problem(name)
                if why:
                    stale.append(Stale(t.where(offset, name), name, why))
        return stale


def _top_level(body) -> dict[str, ast.AST]:
    """Names a module (or class) body defines: defs, classes, assignments, imports, also inside if/try/with."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.setdefault(n.id, node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.setdefault(a.asname or a.name.split(".")[0], node)
        elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For)):
            inner = list(node.body) + list(getattr(node, "orelse", [])) + list(getattr(node, "finalbody", []))
            for h in getattr(node, "handlers", []):
                inner += h.body
            for k, v in _top_level(inner).items():
                names.setdefault(k, v)
    return names


def _import_source(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def check_texts(texts: list[Text], root: Path = ROOT) -> list[Stale]:
    """Every stale path and dotted name in ``texts``, resolved against ``root``."""
    return Checker(root).check(texts)


# The tests' docstrings and strings too (a child process's code is a string: ``from tests.app... import``), less
# the checker's own tests, whose samples are wrong on purpose.
TESTS, OWN_SAMPLES = ("tests",), "tests/test_references.py"


def static_texts(root: Path = ROOT) -> list[Text]:
    """Markdown, docstrings and page texts, and the tests' docstrings and strings: all but --help (subprocesses)."""
    tests = [t for t in docstring_texts(root, TESTS) + page_texts(root, TESTS) if t.path != OWN_SAMPLES]
    return markdown_texts(root) + docstring_texts(root) + page_texts(root) + tests


def check_repository(root: Path = ROOT, helps: bool = True) -> list[Stale]:
    texts, stale = static_texts(root), []
    if helps:
        more, stale = help_texts(root)
        texts += more
    return stale + check_texts(texts, root)


if __name__ == "__main__":
    # python tests/references.py            every stale reference of the repository, one a line
    # python tests/references.py --help-json ROOT MODULE...   (help_texts' subprocess) the helps as JSON
    if sys.argv[1:2] == ["--help-json"]:
        root, modules = sys.argv[2], sys.argv[3:]
        sys.path[0] = root  # the tree's packages, not this file's folder
        real, sys.stdout = sys.stdout, sys.stderr  # what the commands print on import stays out of the JSON
        result = help_json(modules)
        sys.stdout = real
        print(json.dumps(result))
    else:
        sys.path.insert(0, str(ROOT))
        found = check_repository()
        print("\n".join(map(str, found)) or "no stale references")
        sys.exit(1 if found else 0)
