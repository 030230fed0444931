"""The dashboard in a real browser: `streamlit run app.py` served locally, driven by Playwright + Debian chromium.

Every page is opened on an empty runs folder (so it must show the starter set), checked for
exception boxes and rendered plots, and screenshotted; the main forms are used with tiny sizes: a
capture, a quick perplexity sweep, a generation, the Attention page's step slider, a 1-trial retrieval grid.

A second server runs without ``KVLENS_RUNS``, as ``./run.sh`` does: it must list the repository's
runs/, and open there the sweep that the README's ``python -m experiments.perplexity`` just wrote.

Screenshots: runs/browser-screenshots/ (printed; runs/ is git-ignored). The starter set lives in the
user cache (``$KVLENS_STARTER`` overrides): set-up made it, or the dashboard's background worker
computes it while the pages wait (once per machine).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

from tests.app.test_dashboard import run_readme_perplexity
from tests.conftest import REPO, needs_setup

pytestmark = pytest.mark.slow

SHOTS = REPO / "runs" / "browser-screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Bounds, not timings: generous because the 2 CPU cores may be shared with other work.
FIRST_OPEN_S = 600  # a page's first open: the starter set is computed then (once per machine)
ACTION_S = 300  # a form's work with the tiny sizes used here
PLOT = ".js-plotly-plot"
EXCEPTION = '[data-testid="stException"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_browser() -> None:
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        needs_setup("playwright is not installed (./run.sh setup installs it)")
    if not Path(CHROMIUM).is_file():
        needs_setup("Debian's chromium is not installed (./run.sh setup installs it)")


@contextmanager
def serve(env: dict, logs: Path):
    """The base url of `streamlit run app.py` (from the repository root) served on 127.0.0.1 with ``env``;
    the process is killed at the end."""
    port = free_port()
    log = (logs / "streamlit.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"streamlit did not come up on {url}:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base url, runs folder) of a dashboard served on an empty runs folder (``KVLENS_RUNS``)."""
    needs_browser()
    runs = tmp_path_factory.mktemp("browser-runs")
    env = dict(os.environ, KVLENS_RUNS=str(runs), HF_HUB_OFFLINE="1")
    with serve(env, tmp_path_factory.mktemp("browser-log")) as url:
        yield url, runs


@pytest.fixture(scope="module")
def repo_server(tmp_path_factory):
    """(base url, run) of a dashboard served without ``KVLENS_RUNS`` (so on the repository's runs/), where the
    README's perplexity command, run from the repository root, has just written ``run``; removed at the end."""
    needs_browser()
    name = f"browser-readme-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "KVLENS_RUNS"} | {"HF_HUB_OFFLINE": "1"}
    try:
        run = run_readme_perplexity(name)
        with serve(env, tmp_path_factory.mktemp("browser-repo-log")) as url:
            yield url, run
    finally:
        shutil.rmtree(REPO / "runs" / name, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(server):

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    # Streamlit scrolls inside its main block, so a full-page screenshot is only the window: make it tall.
    context = browser.new_context(viewport={"width": 1400, "height": 3000})
    page = context.new_page()
    page.set_default_timeout(ACTION_S * 1000)
    try:
        yield page
    finally:
        context.close()


def settle(page, plots: int, timeout_s: float) -> None:
    """Wait until the script has finished running and ``plots`` plotly figures have been drawn."""
    page.wait_for_selector('[data-testid="stApp"]', timeout=30_000)
    deadline = time.monotonic() + timeout_s
    idle = 0
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stApp"][data-test-script-state="running"]').count()
        drawn = page.locator(f"{PLOT} .main-svg").count() >= plots or page.locator(EXCEPTION).count()
        idle = idle + 1 if not running and drawn else 0
        if idle >= 3:  # stable for three checks: nothing is still arriving over the websocket
            return
        page.wait_for_timeout(500)
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "not-settled.png"))
    raise AssertionError(f"{page.url}: page did not settle in {timeout_s:.0f} s with {plots} plot(s): "
                         f"{page.locator(PLOT).count()} drawn (screenshot {SHOTS / 'not-settled.png'})")


def check(page, name: str, plots: int) -> None:
    """No exception box, at least ``plots`` rendered plots; screenshot to SHOTS/name.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    errors = page.locator(EXCEPTION)
    assert errors.count() == 0, f"{name}: exception on the page:\n{errors.first.text_content()}"
    drawn = page.locator(f"{PLOT} .main-svg")
    assert page.locator(PLOT).count() >= plots and drawn.count() >= plots, f"{name}: plots did not render"
    print(f"screenshot: {SHOTS / name}.png")


def open_page(page, url: str, name: str, plots: int, title: str) -> None:
    page.goto(url)
    settle(page, plots, FIRST_OPEN_S)
    assert page.get_by_role("heading", name=title).count() >= 1, f"{name}: no heading {title!r}"
    check(page, name, plots)


def submit(page, button: str, plots: int) -> None:
    page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_timeout(1000)  # let the rerun start before waiting for it to end
    settle(page, plots, ACTION_S)


def test_every_page_first_open_and_main_forms(server, page):
    url, runs = server
    print(f"screenshots go to {SHOTS}")

    # Home: the starter capture on first open; then a tiny capture through the sidebar form.
    open_page(page, url, "home", 1, "kvlens — what is inside the KV cache")
    assert page.title() == "kvlens — KV cache explorer"
    sidebar = page.locator('[data-testid="stSidebar"]')
    sidebar.get_by_label("tokens", exact=True).fill("64")  # the least the spectra of 64-dim heads accept
    sidebar.get_by_label("run name", exact=True).fill("browser-capture")
    submit(page, "Capture", 1)
    check(page, "home-after-capture", 1)
    assert (runs / "browser-capture" / "meta.json").is_file()
    assert page.get_by_text("saved ").count() >= 1

    # Spectra: the (new) capture run or the starter; key vs value, rank heatmaps, RoPE.
    open_page(page, f"{url}/Spectra", "spectra", 3, "Key and value spectra")

    # Generate: the default example on first open, then a 4-token generation.
    open_page(page, f"{url}/Generate", "generate", 2, "Generate with a compressed cache")
    page.locator('[data-testid="stSidebar"]').get_by_label("max new tokens", exact=True).fill("4")
    page.keyboard.press("Enter")
    submit(page, "Generate", 2)
    check(page, "generate-after-run", 2)
    assert page.get_by_text("4 new tokens in").count() == 2  # compressed and full cache

    # Perplexity: the starter sweep on first open (no sweep in runs/), then a quick sweep.
    open_page(page, f"{url}/Perplexity", "perplexity", 2, "Perplexity under a compressed cache")
    form = page.locator('[data-testid="stSidebar"]')
    form.get_by_label("tokens", exact=True).fill("64")
    form.get_by_label("window", exact=True).fill("16")
    form.get_by_label("budgets", exact=True).fill("8")
    form.get_by_label("run name", exact=True).fill("browser-sweep")
    submit(page, "Run sweep", 2)
    check(page, "perplexity-after-sweep", 2)
    assert (runs / "browser-sweep" / "perplexity.json").is_file()

    # Attention: map, ā, replay strips and mixtures; step the slider back one token.
    open_page(page, f"{url}/Attention", "attention", 4, "Attention and the compressed cache, step by step")
    title = page.locator(PLOT).nth(2).locator(".gtitle")
    before = title.text_content()
    slider = page.get_by_role("slider").first
    slider.focus()
    page.keyboard.press("ArrowLeft")
    page.wait_for_timeout(1000)
    settle(page, 4, ACTION_S)
    check(page, "attention-step-back", 4)
    assert before != title.text_content() and "after token" in title.text_content()

    # Perturbation: the starter Fig. 2 study on first open; a tiny Fig. 2 study through the sidebar form.
    open_page(page, f"{url}/Perturbation", "perturbation", 3,
              "Perturbation: merging vs evicting, head by head and end to end")
    form = page.locator('[data-testid="stSidebar"]')
    form.get_by_label("sequences", exact=True).fill("1")
    form.get_by_label("t0 (fig2)", exact=True).fill("20")
    form.get_by_label("future queries (fig2, ideal)", exact=True).fill("12")
    form.get_by_label("layers (empty: all)", exact=True).fill("0,29")
    form.get_by_label("run name", exact=True).fill("browser-fig2")
    submit(page, "Run study", 3)
    check(page, "perturbation-after-study", 3)
    assert (runs / "browser-fig2" / "perturbation.json").is_file()

    # Heads: the starter profile on first open: scatter, heatmap and the plan's budgets.
    open_page(page, f"{url}/Heads", "heads", 3, "Which heads to compress")

    # Retrieval: the starter passkey grid on first open (heatmap, budget, fates); then a 1-trial grid.
    open_page(page, f"{url}/Retrieval", "retrieval", 3, "Retrieval under a compressed cache")
    form = page.locator('[data-testid="stSidebar"]')
    form.get_by_label("lengths (tokens)", exact=True).fill("96")
    form.get_by_label("depths (%)", exact=True).fill("50")
    form.get_by_label("budgets", exact=True).fill("48")
    form.get_by_label("run name", exact=True).fill("browser-retrieval")
    submit(page, "Run grid", 3)
    check(page, "retrieval-after-grid", 3)
    assert (runs / "browser-retrieval" / "retrieval.json").is_file()


def test_a_readme_run_in_the_repository_runs_folder_opens_on_the_perplexity_page(repo_server, page):
    """No KVLENS_RUNS: the pages list the repository's runs/, where the README's commands write."""
    url, run = repo_server
    page.goto(f"{url}/Perplexity")
    settle(page, 2, FIRST_OPEN_S)
    sidebar = page.locator('[data-testid="stSidebar"]')
    assert sidebar.get_by_text(f"Runs are listed from {run.parent} (set KVLENS_RUNS to change).").count() == 1
    picker = page.locator('[data-testid="stSelectbox"]').filter(has_text="sweep").first
    picker.click()
    page.get_by_role("option", name=run.name, exact=True).click()
    page.wait_for_timeout(1000)
    settle(page, 2, ACTION_S)
    check(page, "perplexity-readme-run", 2)
    # the run's own summary (the starter sweep has 128-token windows of 256 tokens)
    assert page.get_by_text("3 window(s) of 32 tokens (stride 16) from 1 document(s) of 64 tokens").count() == 1
