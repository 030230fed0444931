"""The starter set in the background: each part computed once, never twice at the same time, across processes.

The dashboard does not wait for the starter set (``analysis.app.starter``) before it serves: the first
page that needs a missing part starts one background worker (``python -m analysis.app.background``,
niced, ended when the server that started it ends), which computes every missing part, the parts a
page is waiting for first, while the pages show its progress. ``python -m analysis.app.starter``
(set-up) computes the missing parts in the foreground through the same locks, so the two never
compute one part twice. Files, in ``<starter root>/.jobs/``:

    PART.lock     flock held by whoever computes PART; a second maker waits on it, then finds PART on disk
    PART.json     PART's progress: {"state": "running" | "done" | "failed", "fraction", "pid", "updated", "error"}
    PART.want     touched by a page waiting for PART: the worker computes wanted parts first
    worker.lock   flock held by the background worker for its whole life: one worker at a time
    worker.log    the worker's output

Locks are ``fcntl.flock`` locks: the system releases them when their holder exits, however it exits,
so a killed worker never leaves a part locked. Each part is written into a temp directory and
renamed into place (``analysis.io.atomic_dir``): a part is on disk whole or not at all.
"""

from __future__ import annotations

import _thread
import argparse
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

from analysis.app import starter
from analysis.io import write_json

RESTART_S = 10.0  # a process starts the worker at most once in this many seconds (a worker that dies at once)


def jobs_dir() -> Path:
    folder = starter.root() / ".jobs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def lock_path(part: str) -> Path:
    return jobs_dir() / f"{part}.lock"


def progress_path(part: str) -> Path:
    return jobs_dir() / f"{part}.json"


def want_path(part: str) -> Path:
    return jobs_dir() / f"{part}.want"


def worker_lock_path() -> Path:
    return jobs_dir() / "worker.lock"


def log_path() -> Path:
    return jobs_dir() / "worker.log"


def _lock(path: Path, wait: bool = True) -> int | None:
    """A file descriptor holding an exclusive flock on ``path``; None if ``wait`` is False and it is held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_locked(path: Path) -> bool:
    """Whether some process (or another open file in this one) holds the flock on ``path``."""
    fd = _lock(path, wait=False)
    if fd is None:
        return True
    os.close(fd)
    return False


def read_progress(part: str) -> dict:
    """The part's progress file ({} if there is none yet)."""
    try:
        return json.loads(progress_path(part).read_text())
    except (OSError, ValueError):
        return {}


def _write_progress(part: str, state: str, fraction: float, error: str | None = None) -> None:
    info = {"part": part, "state": state, "fraction": fraction, "pid": os.getpid(), "updated": time.time()}
    write_json(progress_path(part), info | ({"error": error} if error else {}))


def make_part(part: str, load, on_progress=None, wait: bool = True) -> Path | None:
    """Compute starter part ``part`` unless it is on disk, holding its lock, and report its progress.

    ``load()`` returns the model; it is called only when the part is computed here. While another
    process or thread computes the part this one waits for it, then finds it on disk (with
    ``wait=False`` it returns None at once instead). A failure is recorded in the progress file and
    raised; an interruption (Ctrl-C, the worker stopped) leaves nothing behind but a free lock.
    """
    _, folder, _, make = starter.PARTS[part]
    if starter.is_made(part):
        return folder()
    fd = _lock(lock_path(part), wait)
    if fd is None:
        return None
    try:
        if starter.is_made(part):  # made by another process while this one waited
            return folder()
        _write_progress(part, "running", 0.0)
        last = [0.0]

        def report(fraction: float) -> None:
            fraction = min(max(float(fraction), 0.0), 1.0)
            if round(100 * fraction) != round(100 * last[0]):  # a small file, rewritten at most once a percent
                _write_progress(part, "running", fraction)
            last[0] = fraction
            if on_progress:
                on_progress(fraction)

        try:
            out = make(load(), report)
        except Exception as err:
            _write_progress(part, "failed", last[0], f"{type(err).__name__}: {err}")
            raise
        _write_progress(part, "done", 1.0)
        want_path(part).unlink(missing_ok=True)
        return out
    finally:
        os.close(fd)


def worker_running() -> bool:
    return is_locked(worker_lock_path())


def status(part: str) -> dict:
    """Where ``part`` stands, from any process: ``{"state", "fraction", "error"}``.

    state: "done" (on disk), "running" (someone holds its lock; fraction from its progress file),
    "failed" (the last attempt raised ``error``; nobody is on it), "queued" (the worker runs, busy
    with another part) or "idle" (nobody is on it: no worker runs).
    """
    if starter.is_made(part):
        return {"state": "done", "fraction": 1.0}
    info = read_progress(part)
    if is_locked(lock_path(part)):
        return {"state": "running", "fraction": float(info.get("fraction", 0.0)) if info.get("state") == "running"
                else 0.0}
    if info.get("state") == "failed":
        return {"state": "failed", "fraction": 0.0, "error": info.get("error", "")}
    return {"state": "queued" if worker_running() else "idle", "fraction": 0.0}


def busy() -> list[str]:
    """The parts someone is computing now."""
    return [p for p in starter.PARTS if not starter.is_made(p) and is_locked(lock_path(p))]


def missing() -> list[str]:
    """Parts not on disk and not failed: what the worker computes."""
    return [p for p in starter.PARTS if not starter.is_made(p) and read_progress(p).get("state") != "failed"]


def want(part: str) -> None:
    """Ask the worker to compute ``part`` next (a page is waiting for it)."""
    want_path(part).touch()


def next_part(todo: list[str]) -> str:
    """The most recently wanted part of ``todo``, else the first."""
    wanted = [p for p in todo if want_path(p).is_file()]
    return max(wanted, key=lambda p: want_path(p).stat().st_mtime) if wanted else todo[0]


# The workers this process started (reaped on the next call), and when it last started one.
_STARTED: list[subprocess.Popen] = []
_LAST_START = [float("-inf")]
_GUARD = threading.Lock()


def start(retry: str | None = None) -> bool:
    """Start the background worker unless one runs (in any process) or nothing is left to compute.

    ``retry``: forget that part's failure first. Returns whether a worker was started. The worker
    lock is taken here and handed to the child (the same open file), so two sessions or two servers
    asking at once start one worker.
    """
    with _GUARD:
        for proc in list(_STARTED):
            if proc.poll() is not None:
                _STARTED.remove(proc)
        if retry:
            progress_path(retry).unlink(missing_ok=True)
        elif time.monotonic() - _LAST_START[0] < RESTART_S:
            return False
        if not missing():
            return False
        fd = _lock(worker_lock_path(), wait=False)
        if fd is None:
            return False
        repo = Path(__file__).resolve().parents[2]  # the folder holding the analysis package
        command = [sys.executable, "-m", "analysis.app.background", "--lock-fd", str(fd), "--parent", str(os.getpid())]
        env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"))  # no hub downloads
        try:
            with log_path().open("ab") as log:
                proc = subprocess.Popen(command, cwd=repo, env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=subprocess.STDOUT)
        finally:
            os.close(fd)  # the child holds the lock now, through its copy
        _STARTED.append(proc)
        _LAST_START[0] = time.monotonic()
        return True


def stop_started(timeout: float = 10.0) -> None:
    """End the workers this process started (tests; a server's workers end with it on their own)."""
    with _GUARD:
        for proc in _STARTED:
            proc.terminate()
        for proc in _STARTED:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        _STARTED.clear()
        _LAST_START[0] = float("-inf")


def work(parent: int | None = None) -> int:
    """The worker: compute every missing part, wanted ones first; stop within a second or so once ``parent``
    (the server) has exited: a KeyboardInterrupt in the main thread, so the part's temp dir is removed."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        _thread.interrupt_main()

    if parent:
        threading.Thread(target=watch, daemon=True).start()
    loaded = []

    def load():
        if not loaded:
            loaded.append(starter.load_model("default"))
        return loaded[0]

    tried, failed = set(), 0
    while todo := [p for p in missing() if p not in tried]:
        part = next_part(todo)
        tried.add(part)
        print(f"{time.strftime('%H:%M:%S')} {starter.PARTS[part][0]}", flush=True)
        try:
            make_part(part, load)
        except Exception:  # recorded in its progress file for the pages; the other parts go on
            traceback.print_exc()
            failed += 1
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.app.background", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock-fd", type=int, help="an open file already holding the worker lock (from start())")
    parser.add_argument("--parent", type=int, help="stop when this process (the dashboard) has exited")
    args = parser.parse_args(argv)
    fd = args.lock_fd if args.lock_fd is not None else _lock(worker_lock_path(), wait=False)
    if fd is None:
        print("a starter worker is already running", flush=True)
        return 0
    os.nice(10)  # the pages' own work goes first
    try:
        return work(args.parent)
    except KeyboardInterrupt:  # Ctrl-C, or the server has exited: nothing half-written is left
        print("stopped", flush=True)
        return 0


if __name__ == "__main__":
    sys.exit(main())
