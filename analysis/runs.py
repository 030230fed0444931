"""Result directories on disk: captures (safetensors + JSON) and atomic output for every command.

Every command builds its output in a hidden temp directory beside the target and renames it into
place at the end, so a crash or Ctrl-C never leaves a half-written directory that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.capture import Capture
from analysis.errors import UserError

META = "meta.json"
TENSORS = "tensors.safetensors"


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


def save_run(capture: Capture, out: str | Path, overwrite: bool = False) -> Path:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in capture.tensors.items()}
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        write_json(tmp / META, capture.meta)
    return Path(out)


def load_meta(path: str | Path) -> dict:
    path = Path(path)
    if not (path / META).is_file() or not (path / TENSORS).is_file():
        raise UserError(f"{path} is not a capture run (no {META} and {TENSORS})")
    return json.loads((path / META).read_text())


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Capture:
    meta = load_meta(path)
    return Capture(load_file(str(Path(path) / TENSORS), device=str(device)), meta)


def list_runs(root: str | Path = "runs") -> list[Path]:
    """Capture runs directly under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [p for p in root.iterdir() if (p / META).is_file() and (p / TENSORS).is_file()]
    return sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)
