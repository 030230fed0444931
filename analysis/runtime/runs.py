"""Result directories on disk: captures (safetensors + JSON) and atomic output for every command.

Every command builds its output in a hidden temp directory beside the target and renames it into
place at the end, so a crash or Ctrl-C never leaves a half-written directory that loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from analysis.errors import UserError
from analysis.io import atomic_dir, write_json
from analysis.runtime.capture import Capture

META = "meta.json"


TENSORS = "tensors.safetensors"


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
