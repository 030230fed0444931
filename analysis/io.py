"""Writing results safely: run directories and files that appear whole or not at all, and resume checks.

Every command builds its output in a hidden temp directory beside the target and renames it into
place at the end (``atomic_dir``); single files go through a temp file and ``os.replace``
(``write_atomic``, ``write_json``, ``save_tensors``). A crash or Ctrl-C never leaves a half-written
result that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from analysis.errors import UserError

META = "meta.json"  # a capture run's metadata file (analysis.runtime.runs)


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``out`` holds something we must not replace."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        what = "another run" if (out / META).is_file() else "other files"
        raise UserError(f"--out {out} already holds {what}; pass --overwrite to replace it")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield a temp directory; on success it replaces ``out`` in one rename, on error it vanishes."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; results are meant to be shared
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (temp file + rename) in the file's own directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def load_partial_settings(partial: Path, settings: dict, ignore: tuple[str, ...] = (), write: bool = True) -> None:
    """Create ``partial`` for these settings, or check an existing one was made with the same.

    Keys in ``ignore`` are recorded but may differ on resume (results are stored per window).
    """
    partial.mkdir(parents=True, exist_ok=True)
    path = partial / "settings.json"
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(settings) | set(before) if k not in ignore and before.get(k) != settings.get(k))
        if changed:
            raise UserError(f"{partial} holds an unfinished run with other settings ({', '.join(changed)}); "
                            "pass --overwrite to start again")
    elif write:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings, indent=1))
        tmp.replace(path)


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; figures are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
