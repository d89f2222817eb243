#!/usr/bin/env bash
# Set up (with the dev tools) and run the whole check: ruff, mypy, then the pytest suite,
# including the integration tests that start the real broker, Faust worker, Feast store and chdb.
# With no arguments the tests marked `slow` are left out (they have their own command: --all runs
# everything); other arguments go to pytest (e.g. -m integration, or a test's path).
# mypy runs beside pytest, its report printed after pytest's; the command fails when either does.
# The suite runs in two parts: the tests outside tests/integration on two pytest-xdist workers (a
# file's tests stay on one worker, so module fixtures are built once), then the integration tests,
# which start whole stacks of processes, one at a time; the last line adds up both parts.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "== test.sh: $1 (${SECONDS} s in)"; }
step "set-up"
bash scripts/setup.sh --dev
step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
split=1
if [ "$#" -eq 0 ]; then
  set -- -m "not slow"
elif [ "$1" = "--all" ]; then
  shift
else
  split=0
fi
mypy_log=$(mktemp)
unit_log=$(mktemp)
integration_log=$(mktemp)
trap 'rm -f "$mypy_log" "$unit_log" "$integration_log"' EXIT
step "mypy (in the background) and pytest"
.venv/bin/mypy >"$mypy_log" 2>&1 &
mypy_pid=$!
status=0
count() {  # count WORD LOG: the number before WORD in pytest's summary line (0 if absent)
  tail -n 1 "$2" | grep -oE "[0-9]+ $1" | grep -oE "^[0-9]+" || echo 0
}
if [ "$split" -eq 1 ]; then
  .venv/bin/python -m pytest "$@" -n 2 --dist loadfile --ignore=tests/integration \
    | tee "$unit_log" || status=$?
  step "integration tests, one at a time"
  .venv/bin/python -m pytest "$@" tests/integration | tee "$integration_log" || status=$?
  passed=$(($(count passed "$unit_log") + $(count passed "$integration_log")))
  failed=$(($(count failed "$unit_log") + $(count failed "$integration_log")))
  errors=$(($(count error "$unit_log") + $(count error "$integration_log")))
  echo "test.sh: ${passed} passed, ${failed} failed, ${errors} errors"
else
  .venv/bin/python -m pytest "$@" || status=$?
fi
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
