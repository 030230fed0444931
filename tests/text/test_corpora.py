"""Corpora: R data decoding, Debian fetch bookkeeping, cleaning, user text, token windows."""

import gzip
import struct
import time
import zlib

import pytest

from analysis.errors import UserError
from analysis.paths import corpora_dir
from analysis.text import corpora, rdata
from analysis.text.corpora import (
    CORPORA,
    Document,
    fetch_corpora,
    is_fetched,
    load_corpus,
    load_documents,
    load_text,
    token_sequences,
)
from tests.conftest import needs_setup

# ------------------------------------------------------------- a tiny R serialiser for fixtures


def _i(*values):
    return struct.pack(f">{len(values)}i", *values)


def _chars(s):
    if s is None:
        return _i(9, -1)
    raw = s.encode("utf-8")
    return _i((8 << 12) | 9, len(raw)) + raw  # CHARSXP flagged UTF-8


def _strs(items):
    return _i(16, len(items)) + b"".join(_chars(s) for s in items)


def _names(names):  # attribute pairlist: names = c(...)
    return _i(2 | 1 << 10) + _i(1) + _chars("names") + _strs(names) + _i(254)


def _named_list(mapping):
    return _i(19 | 1 << 9, len(mapping)) + b"".join(mapping.values()) + _names(list(mapping))


def _serialise(body):
    return b"X\n" + _i(3, 0x040201, 0x030500, 5) + b"UTF-8" + body


def _lazyload_db(tmp_path, objects):
    """Write Rdata.rdx/.rdb holding {name: lines} the way R's lazy-load DB does."""
    rdb, index = b"", {}
    for name, lines in objects.items():
        payload = _serialise(_strs(lines))
        blob = struct.pack(">I", len(payload)) + zlib.compress(payload)
        index[name] = _i(13, 2, len(rdb), len(blob))
        rdb += blob
    rdx = _serialise(_named_list({"variables": _named_list(index),
                                  "references": _named_list({}), "compressed": _i(10, 1, 1)}))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(rdx))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    return tmp_path


def test_rdata_synthetic(tmp_path):
    novels = {"emma": ["EMMA", "", None, "Emma Woodhouse, handsome", "naïve"], "tiny": ["x"]}
    got = rdata.read_novels(_lazyload_db(tmp_path, novels))
    assert got == {"emma": ["EMMA", "", "Emma Woodhouse, handsome", "naïve"], "tiny": ["x"]}


@pytest.mark.parametrize("blob, message", [
    (b"A\n" + _i(3), "not an XDR"),
    (b"X\n" + _i(7, 0, 0), "version 7"),
    (_serialise(_i(16, 3) + _chars("a")), "truncated"),
    (_serialise(_i(25, 0)), "unsupported R object type 25"),
])
def test_rdata_malformed(blob, message):
    with pytest.raises(ValueError, match=message):
        rdata.unserialize(blob)


def test_rdata_bad_entries(tmp_path):
    db = _lazyload_db(tmp_path, {"a": ["line"]})
    rdb = (db / "Rdata.rdb").read_bytes()
    (db / "Rdata.rdb").write_bytes(rdb[:4] + b"garbage" + rdb[11:])
    with pytest.raises(ValueError, match="does not decompress"):
        rdata.read_novels(db)
    (db / "Rdata.rdb").write_bytes(rdb[:10])
    with pytest.raises(ValueError, match="outside"):
        rdata.read_novels(db)
    (db / "Rdata.rdx").write_bytes(gzip.compress(_serialise(_strs(["no index"]))))
    with pytest.raises(ValueError, match="variables"):
        rdata.read_novels(db)


def _austen_dir():
    found = sorted((corpora_dir() / "root").glob("usr/lib/R/site-library/janeaustenr/data"))
    if not found:
        needs_setup("r-cran-janeaustenr not fetched (python -m analysis.text.corpora fetch books)")
    return found[0]


def test_rdata_real_package():
    novels = rdata.read_novels(_austen_dir())
    assert sorted(novels) == ["emma", "mansfieldpark", "northangerabbey", "persuasion",
                              "prideprejudice", "sensesensibility"]
    assert all(len(lines) > 5000 for lines in novels.values())
    assert any("Emma Woodhouse" in line for line in novels["emma"])


# ---------------------------------------------------------------------------------- corpora

EXPECTED_IDS = {"books": "books/austen/emma", "web": "web/python3.11-doc/library/os.rst",
                "latex": "latex/pari-doc/usersch3.tex", "math": "math/metamath/set.mm"}


@pytest.mark.parametrize("name", list(CORPORA))
def test_load_corpus(name):
    if not is_fetched(name):
        needs_setup(f"corpus {name!r} not fetched (python -m analysis.text.corpora fetch {name})")
    docs = load_corpus(name)
    ids = [d.id for d in docs]
    assert docs and len(set(ids)) == len(ids) and EXPECTED_IDS[name] in ids
    assert all(d.corpus == name and d.id.startswith(name + "/") and d.text.strip() for d in docs)
    assert all("\r" not in d.text for d in docs[:50])
    assert [d.id for d in load_corpus(name)] == ids  # deterministic order
    if name == "books":
        emma = docs[0].text
        assert "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and" in emma
        assert "\n\n" in emma and "\n\n\n" not in emma


def test_second_fetch_is_instant():
    if not all(is_fetched(n) for n in CORPORA):
        needs_setup("not all corpora fetched (python -m analysis.text.corpora fetch)")
    start = time.perf_counter()
    fetch_corpora(progress=False)
    assert time.perf_counter() - start < 1.0


def test_cleaning_helpers():
    assert corpora.austen_text(["CHAPTER I", "", "", "It was a", "truth.", "", "  verse",
                                "  more"]) == "CHAPTER I\n\nIt was a truth.\n\n  verse\n  more"
    text = corpora.html_text("<html><title>T</title><style>x{}</style><P>One\n <b>two</b>"
                             "&amp; three<br>four</P><p>five</p></html>")
    assert text == "T\n\nOne two& three\nfour\n\nfive"


def test_interrupted_fetch_is_redone(tmp_path, monkeypatch):
    """The marker is written last: a failure while unpacking leaves the corpus unfetched."""
    monkeypatch.setenv("KVLENS_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.shutil, "which", lambda tool: f"/usr/bin/{tool}")
    calls, fail = [], [True]

    def fake_run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[1] == "download":
            for package in cmd[2:]:
                (cwd / f"{package}_1.0_all.deb").write_bytes(b"deb")
        elif fail[0]:
            raise UserError("dpkg-deb -x failed: interrupted")

    monkeypatch.setattr(corpora, "_run", fake_run)
    with pytest.raises(UserError, match="interrupted"):
        fetch_corpora(["latex"], progress=False)
    assert not is_fetched("latex")
    fail[0] = False
    fetch_corpora(["latex"], progress=False)
    assert is_fetched("latex") and calls.count(["apt-get", "download"]) == 2
    calls.clear()
    fetch_corpora(["latex"], progress=False)
    assert calls == []


# -------------------------------------------------------------------------------- bad input

def test_unknown_corpus():
    for call in (lambda: load_documents(corpus="novels"), lambda: load_corpus("novels"),
                 lambda: fetch_corpora(["novels"])):
        with pytest.raises(UserError, match="unknown corpus 'novels'; valid names: books, web"):
            call()


def test_corpus_not_fetched(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLENS_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"not downloaded.*python -m analysis.text.corpora fetch books"):
        load_corpus("books")


def test_no_debian_client(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLENS_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserError, match=r"apt-get and dpkg-deb not found.*--text FILE_OR_DIR"):
        fetch_corpora(["latex"], progress=False)


def test_apt_download_failure(tmp_path, monkeypatch):
    if corpora.shutil.which("apt-get") is None or corpora.shutil.which("dpkg-deb") is None:
        pytest.skip("no apt-get/dpkg-deb on this machine")
    monkeypatch.setenv("KVLENS_CACHE", str(tmp_path))
    monkeypatch.setitem(CORPORA, "bogus", ("kvlens-no-such-package",))
    with pytest.raises(UserError, match=r"apt-get download failed.*E: .*kvlens-no-such-package"):
        fetch_corpora(["bogus"], progress=False)
    assert not is_fetched("bogus")


def test_load_documents_needs_one_source(tmp_path):
    for kwargs in ({}, {"corpus": "books", "text": str(tmp_path)}):
        with pytest.raises(UserError, match="exactly one"):
            load_documents(**kwargs)


def test_load_text_file_and_dir(tmp_path):
    (tmp_path / "a.txt").write_bytes("héllo\r\nworld\n".encode())
    assert load_text(tmp_path / "a.txt") == [Document("a.txt", "text", "héllo\nworld\n")]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "proof.v").write_text("Lemma x : True.\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x01")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    docs = load_documents(text=str(tmp_path))
    assert [d.id for d in docs] == ["a.txt", "sub/proof.v"]
    assert all(d.corpus == "text" for d in docs)


def test_load_text_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or directory"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty.txt: the file is empty"):
        load_text(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin.txt: not UTF-8 text \(byte 0xe9 at offset 3\)"):
        load_text(tmp_path / "latin.txt")
    (tmp_path / "empty.txt").unlink()
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01\x02")
    with pytest.raises(UserError, match=r"no readable UTF-8 text.*2 empty, binary or non-UTF-8"):
        load_text(tmp_path)


# ----------------------------------------------------------------------------- token windows

class SpaceTokenizer:
    """Token ids are the integers written in the text, split on whitespace."""

    def __init__(self):
        self.longest_input = 0

    def encode(self, text, add_special_tokens=True):
        self.longest_input = max(self.longest_input, len(text))
        return [int(w) for w in text.split()]


class CallTokenizer:
    def __call__(self, text):
        return {"input_ids": [int(w) for w in text.split()]}


def _doc(name, start, n):
    return Document(name, "text", " ".join(str(i) for i in range(start, start + n)))


DOCS = [_doc("a", 0, 10), _doc("b", 100, 3), _doc("c", 1000, 25)]


def test_token_sequences_first_tokens_in_order():
    for tok in (SpaceTokenizer(), CallTokenizer()):
        got = token_sequences(tok, DOCS, tokens=5, count=2)
        assert got == [("a", [0, 1, 2, 3, 4]), ("c", [1000, 1001, 1002, 1003, 1004])]
    assert token_sequences(SpaceTokenizer(), DOCS, tokens=5) == [("a", [0, 1, 2, 3, 4])]


def test_token_sequences_extra_chunks_from_longest():
    got = token_sequences(SpaceTokenizer(), DOCS, tokens=5, count=5)
    assert [name for name, _ in got] == ["a", "c", "c#1", "c#2", "c#3"]
    assert got[3][1] == [1010, 1011, 1012, 1013, 1014]
    assert all(len(ids) == 5 for _, ids in got)
    everything = token_sequences(SpaceTokenizer(), DOCS, tokens=5, count=100)
    assert len(everything) == 2 + 5  # a has 2 chunks, c has 5; no overlap, no short tail


def test_token_sequences_only_tokenises_a_prefix():
    tok = SpaceTokenizer()
    long_doc = _doc("long", 10_000, 200_000)  # 1.2 MB of text
    assert token_sequences(tok, [long_doc], tokens=50) == [("long", list(range(10_000, 10_050)))]
    assert tok.longest_input < 10_000


def test_token_sequences_too_few_tokens():
    with pytest.raises(UserError, match="--tokens 30 is more than the text provides: "
                                        "the longest document has 25 tokens"):
        token_sequences(SpaceTokenizer(), DOCS, tokens=30)
