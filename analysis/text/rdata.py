"""Decode the Jane Austen novels from r-cran-janeaustenr's lazy-load database, stdlib only.

Why not PyPI ``rdata``: it pulls in pandas and xarray for what is a few dozen lines of format
logic. An R lazy-load database is two files:

* ``Rdata.rdx``: a gzip'd R serialisation (XDR) of ``list(variables=, references=, compressed=)``
  where ``variables`` maps each object name to ``c(offset, length)`` in the ``.rdb`` file;
* ``Rdata.rdb``: the objects, each ``[4-byte big-endian uncompressed length][compressed stream]``
  (zlib when ``compressed`` is TRUE/1; a 1-byte type marker precedes bzip2/xz streams for 2/3).

Each novel is a character vector (STRSXP) of lines; NA lines are dropped. Only the handful of R
types these files use are decoded; anything else raises ValueError naming the type.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from pathlib import Path

# R SEXP type codes (R Internals, "Serialization formats").
SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 1, 2, 9, 10, 13, 14, 16, 19


NILVALUE_SXP, REFSXP = 254, 255


NA_INTEGER = -(2**31)


_HAS_ATTR, _HAS_TAG = 1 << 9, 1 << 10


_LATIN1, _UTF8 = 1 << 2, 1 << 3


class _Reader:
    """Cursor over an XDR (big-endian) R serialisation stream."""

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"R data truncated: wanted {n} bytes at offset {self.pos}, "
                             f"stream has {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def header(self) -> None:
        magic = self.take(2)
        if magic != b"X\n":
            raise ValueError(f"not an XDR R serialisation (header {magic!r}, expected b'X\\n'); "
                             "ASCII and native formats are not supported")
        version = self.int()
        if version not in (2, 3):
            raise ValueError(f"unsupported R serialisation version {version} (expected 2 or 3)")
        self.int(), self.int()  # writer's R version, minimal reader version
        if version == 3:
            self.take(self.int())  # native encoding name, e.g. b"UTF-8"

    def charsxp(self, flags: int) -> str | None:
        n = self.int()
        if n == -1:
            return None
        raw = self.take(n)
        return raw.decode("latin-1" if (flags >> 12) & _LATIN1 else "utf-8", errors="replace")

    def item(self):
        """One R object -> str / None (NA) / list / dict (vectors with names)."""
        flags = self.int()
        kind = flags & 0xFF
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            if not 1 <= index <= len(self.refs):
                raise ValueError(f"bad R reference index {index}")
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()  # a CHARSXP
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            return self.charsxp(flags)
        if kind == LISTSXP:
            return self.pairlist(flags)
        if kind in (LGLSXP, INTSXP):
            n = self.int()
            values = list(struct.unpack(f">{n}i", self.take(4 * n)))
            value = [None if v == NA_INTEGER else v for v in values]
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind in (STRSXP, VECSXP):
            n = self.int()
            if n < 0:
                raise ValueError(f"bad R vector length {n}")
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R object type {kind} at offset {self.pos - 4}")
        if flags & _HAS_ATTR:
            names = self.pairlist_attrs().get("names")
            if isinstance(names, list) and len(names) == len(value):
                return dict(zip(names, value))
        return value

    def pairlist(self, flags: int) -> dict:
        """A pairlist (attributes, arguments) as {tag: value}, read iteratively."""
        out = {}
        while True:
            if flags & _HAS_ATTR:
                self.pairlist_attrs()
            tag = self.item() if flags & _HAS_TAG else len(out)
            out[tag] = self.item()
            flags = self.int()
            if flags & 0xFF == NILVALUE_SXP:
                return out
            if flags & 0xFF != LISTSXP:
                raise ValueError(f"malformed R pairlist (type {flags & 0xFF} in a CDR)")

    def pairlist_attrs(self) -> dict:
        flags = self.int()
        if flags & 0xFF != LISTSXP:
            raise ValueError(f"malformed R attributes (type {flags & 0xFF}, expected a pairlist)")
        return self.pairlist(flags)


def unserialize(data: bytes):
    """Decode one XDR R serialisation (as written by saveRDS/serialize) into Python values."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def read_index(rdx: bytes) -> tuple[dict[str, tuple[int, int]], int]:
    """Parse an ``.rdx`` file: ({name: (offset, length)}, compression type)."""
    if rdx[:2] == b"\x1f\x8b":
        try:
            rdx = gzip.decompress(rdx)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"corrupt gzip in .rdx index: {exc}") from exc
    index = unserialize(rdx)
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise ValueError("R .rdx index has no 'variables' list")
    table = {}
    for name, pos in index["variables"].items():
        if not (isinstance(pos, list) and len(pos) == 2 and all(isinstance(v, int) for v in pos)):
            raise ValueError(f"R .rdx entry {name!r} is not c(offset, length): {pos!r}")
        table[name] = (pos[0], pos[1])
    compressed = index.get("compressed", [1])
    kind = compressed[0] if isinstance(compressed, list) and compressed else 1
    return table, 1 if kind is True else int(kind or 0)


def read_object(rdb: bytes, offset: int, length: int, compression: int = 1):
    """Decompress and unserialise the object stored at ``rdb[offset:offset+length]``."""
    if offset < 0 or length < 5 or offset + length > len(rdb):
        raise ValueError(f"R .rdb entry ({offset}, {length}) is outside the {len(rdb)}-byte file")
    blob = rdb[offset:offset + length]
    size = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    try:
        if compression in (2, 3) and body[:1] in (b"0", b"2", b"Z"):
            marker, body = body[:1], body[1:]
            data = {b"0": lambda b: b, b"2": bz2.decompress, b"Z": lzma.decompress}[marker](body)
        elif compression == 0:
            data = body
        else:
            data = zlib.decompress(body)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise ValueError(f"R .rdb entry at {offset} does not decompress: {exc}") from exc
    if len(data) != size:
        raise ValueError(f"R .rdb entry at {offset}: {len(data)} bytes, header says {size}")
    return unserialize(data)


def read_novels(data_dir: str | Path) -> dict[str, list[str]]:
    """The six novels from a ``janeaustenr/data`` directory: {name: lines}, NA lines dropped."""
    data_dir = Path(data_dir)
    table, compression = read_index((data_dir / "Rdata.rdx").read_bytes())
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    novels = {}
    for name, (offset, length) in table.items():
        lines = read_object(rdb, offset, length, compression)
        if not isinstance(lines, list) or not all(isinstance(x, (str, type(None))) for x in lines):
            raise ValueError(f"R object {name!r} is not a character vector")
        novels[name] = [line for line in lines if line is not None]
    return novels
