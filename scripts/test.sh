#!/usr/bin/env bash
# Set up (with the dev tools) and run the whole check: ruff, mypy, then the pytest suite,
# including the integration tests that start the real broker, Faust worker, Feast store and chdb.
# With no arguments the tests marked `slow` are left out (they have their own command: --all runs
# everything); other arguments go to pytest (e.g. -m integration, or a test's path).
# mypy runs beside pytest (one core each for its minute), its report printed after pytest's; the
# command fails when either does.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "== test.sh: $1 (${SECONDS} s in)"; }
step "set-up"
bash scripts/setup.sh --dev
step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
elif [ "$1" = "--all" ]; then
  shift
fi
mypy_log=$(mktemp)
trap 'rm -f "$mypy_log"' EXIT
step "mypy (in the background) and pytest"
.venv/bin/mypy >"$mypy_log" 2>&1 &
mypy_pid=$!
status=0
.venv/bin/python -m pytest "$@" || status=$?
mypy_status=0
wait "$mypy_pid" || mypy_status=$?
step "mypy's report"
cat "$mypy_log"
if [ "$mypy_status" -ne 0 ]; then
  echo "test.sh: mypy failed" >&2
  status=1
fi
step "done, exit ${status}"
exit "$status"
