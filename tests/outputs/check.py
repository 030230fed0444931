"""Recorded outputs: the same small commands must keep giving the same numbers, bit for bit.

    python -m tests.outputs.check record    # run every command below and store what it wrote
    python -m tests.outputs.check compare   # run them again and compare with what was stored
    python -m tests.outputs.check compare --only perplexity,stream

One small run of each command (capture, spectra, perplexity, the stream, each perturbation mode,
the three head steps, one figure) on the embedded model. From each output directory we keep every
JSON file (less the fields that measure time or name a place) and a SHA-256 of every tensor in
every safetensors file, in ``tests/outputs/recorded/NAME.json``. ``compare`` reports the first
difference of each command; ``tests/test_outputs.py`` runs it in the suite. A change that moves a
number on purpose re-records with ``record`` and says why in its commit.

Bits depend on the machine: another CPU (its vector kernels) or another torch gives other last bits
everywhere. ``record`` writes the machine it ran on into ``recorded/machine.json``; on another machine
``compare`` says so, and the outputs must first be re-recorded there *at the last commit that was
compared* (a checkout of it, ``record``, the JSON files copied back), so that a difference still means
the change moved a number.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

RECORDED = Path(__file__).parent / "recorded"
VOLATILE = {"seconds", "tokens_per_second", "device", "elapsed", "elapsed_s", "command", "out", "path", "created",
            "wall_seconds", "started", "finished", "python", "torch", "transformers", "source_dir", "run"}

PERTURB = ["--sequences", "1", "--layers", "0,1", "--no-png", "--quiet"]
COMMANDS: dict[str, list[str]] = {
    "capture": ["capture", "--tokens", "40", "--layers", "0,1"],
    "spectra": ["spectra", "--sequences", "2", "--tokens", "64", "--layers", "0,1", "--no-png"],
    "perplexity": ["perplexity", "--tokens", "72", "--documents", "1", "--window", "48", "--budget", "16,24",
                   "--methods", "full,streaming_llm,h2o,tova,cam,weightedkv,weightedkv_evict,random", "--no-png"],
    "stream": ["perplexity", "--stream", "--tokens", "48", "--documents", "2", "--budget", "16", "--no-png"],
    "fig2": ["perturbation", "fig2", "--t0", "24", "--future", "16", *PERTURB],
    "sweep": ["perturbation", "sweep", "--tokens", "40", "--budget", "16",
              "--methods", "weightedkv,weightedkv_evict,h2o,tova,cam,streaming_llm,random", *PERTURB],
    "end2end": ["perturbation", "end2end", "--tokens", "40", "--budget", "16", "--sequences", "1", "--no-png",
                "--quiet"],
    "ideal": ["perturbation", "ideal", "--tokens", "48", "--steps", "20,24", "--future", "8", *PERTURB],
    "heads_profile": ["heads", "profile", "--tokens", "80", "--documents", "1", "--budgets", "16,24", "--no-png"],
    "heads_plan": ["heads", "plan", "--profile", "{heads_profile}", "--total-budget", "16x", "--no-png"],
    "heads_evaluate": ["heads", "evaluate", "--plan", "{heads_plan}/plan.json", "--tokens", "48", "--documents", "1",
                       "--skip", "1", "--window", "48", "--baselines", "uniform,layer,random", "--no-png"],
    "fig3_replay": ["figures", "--quick", "--only", "fig3_replay", "--no-png"],
}
NO_QUIET = {"fig2", "sweep", "end2end", "ideal", "heads_plan"}  # those take --quiet already, or have none


def machine() -> dict:
    """What the recorded bits depend on: torch, its CPU kernels, the processor."""
    flags = next((line.split(":", 1)[1].split() for line in _cpuinfo() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "?")
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "processor": f"{platform.machine()} {model}",
            "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:16]}


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.is_file() else []


def recorded_machine() -> dict | None:
    path = RECORDED / "machine.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _strip(data, work: str):
    """Drop the fields that measure time or name a place; paths under the work directory become relative."""
    if isinstance(data, dict):
        return {k: _strip(v, work) for k, v in data.items() if k not in VOLATILE}
    if isinstance(data, list):
        return [_strip(v, work) for v in data]
    if isinstance(data, str) and data.startswith(work):
        return "<work>" + data[len(work):]
    return data


def _tensors(path: Path) -> dict[str, str]:
    return {name: f"{tuple(t.shape)} {t.dtype} " + hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:24]
            for name, t in sorted(load_file(str(path)).items())}


def snapshot(directory: Path, work: Path) -> dict:
    """What a run directory holds that must not change: JSON less volatile fields, tensor digests."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if rel.startswith(".") or "/." in rel or not path.is_file():
            continue
        if path.suffix == ".json":
            out[rel] = _strip(json.loads(path.read_text()), str(work))
        elif path.suffix == ".safetensors":
            out[rel] = _tensors(path)
    return out


def run(name: str, work: Path, dirs: dict[str, Path], in_process: bool = False) -> dict:
    """Run one command into ``work/name``: in a subprocess, or (``in_process``, faster) through its ``main``."""
    out = work / name
    argv = [a.format(**{k: str(v) for k, v in dirs.items()}) for a in COMMANDS[name]]
    extra = [] if name in NO_QUIET or name == "fig3_replay" else ["--quiet"]
    args = [*argv[1:], *extra, "--out", str(out)]
    if in_process:  # one thread, as the recording's subprocesses ran: another count sums in another order
        os.environ["HF_HUB_OFFLINE"] = "1"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                importlib.import_module(f"experiments.{argv[0]}").main(args)
        finally:
            torch.set_num_threads(threads)
    else:
        cmd = [sys.executable, "-m", f"experiments.{argv[0]}", *args]
        env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    dirs[name] = out
    return snapshot(out, work)


def first_difference(want, got, where: str = "") -> str | None:
    if isinstance(want, dict) and isinstance(got, dict):
        for key in sorted(set(want) | set(got)):
            if key not in got or key not in want:
                return f"{where}/{key}: only in {'recorded' if key in want else 'new'} output"
            found = first_difference(want[key], got[key], f"{where}/{key}")
            if found:
                return found
        return None
    if isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            return f"{where}: {len(want)} items recorded, {len(got)} now"
        for i, (a, b) in enumerate(zip(want, got)):
            found = first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if want == got else f"{where}: recorded {want!r}, now {got!r}"


def compare(names: list[str] | None = None, in_process: bool = False) -> dict[str, str | None]:
    """{name: None if the outputs are the recorded ones, else the first difference}."""
    names = names or list(COMMANDS)
    found: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix="kvlens-outputs-") as tmp:
        dirs: dict[str, Path] = {}
        for name in COMMANDS:  # in order: later commands read earlier outputs
            if name not in names and not any("{" + name + "}" in a for n in names for a in COMMANDS[n]):
                continue
            got = run(name, Path(tmp), dirs, in_process)
            if name in names:
                want = json.loads((RECORDED / f"{name}.json").read_text())
                found[name] = first_difference(want, json.loads(json.dumps(got)))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.outputs.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("record", "compare"))
    parser.add_argument("--only", default=None, help="comma list of names (default: all)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(COMMANDS)
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        parser.error(f"unknown name(s) {', '.join(unknown)}; valid: {', '.join(COMMANDS)}")
    if args.action == "compare":
        if recorded_machine() != machine():
            print(f"note: recorded on {recorded_machine()}, this is {machine()}: differences in the last bits are "
                  "the machine's; re-record at the last compared commit first (see --help)")
        found = compare(names)
        for name, diff in found.items():
            print(f"{name}: {'same' if diff is None else 'DIFFERS ' + diff}")
        return 1 if any(found.values()) else 0
    with tempfile.TemporaryDirectory(prefix="kvlens-outputs-") as tmp:
        dirs: dict[str, Path] = {}
        for name in COMMANDS:
            if name not in names and not any("{" + name + "}" in a for n in names for a in COMMANDS[n]):
                continue
            got = run(name, Path(tmp), dirs)
            RECORDED.mkdir(exist_ok=True)
            (RECORDED / f"{name}.json").write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
            print(f"recorded {name}")
    (RECORDED / "machine.json").write_text(json.dumps(machine(), indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
