#!/usr/bin/env bash
# Set up (with the dev tools) and run the whole check: ruff, mypy, then the full pytest suite,
# including the integration tests that start the real broker, Faust worker, Feast store and chdb.
# With no arguments the tests marked `slow` are left out (they have their own command: --all runs
# everything); other arguments go to pytest (e.g. -m integration, or a test's path).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
elif [ "$1" = "--all" ]; then
  shift
fi
.venv/bin/python -m pytest "$@"
