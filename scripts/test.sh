#!/usr/bin/env bash
# Set up (with the dev tools) and run the whole check: ruff, mypy, then the full pytest suite,
# including the integration tests that start the real broker, Faust worker, Feast store and chdb.
# Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
