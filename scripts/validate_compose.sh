#!/usr/bin/env bash
# Validate the production stack's files offline (there is no Docker engine here): Debian's
# docker-compose `config -q` checks docker/compose.yaml's format, interpolation and references;
# dclint checks it against the current Compose specification and its best-practice rules
# (docker/.dclintrc); hadolint lints the Dockerfiles. `bash scripts/setup.sh --dev` installs all
# three; tests/test_docker.py runs the same checks.
set -euo pipefail
cd "$(dirname "$0")/.."
dclint=.tools/dclint/node_modules/.bin/dclint
hadolint=.venv/bin/hadolint
if ! command -v docker-compose >/dev/null || [ ! -x "$dclint" ] || [ ! -x "$hadolint" ]; then
  echo "validate_compose: docker-compose, dclint or hadolint is missing: run bash scripts/setup.sh --dev" >&2
  exit 1
fi
# The stack requires a ClickHouse password; any value does when only the file is checked.
CLICKHOUSE_PASSWORD="${CLICKHOUSE_PASSWORD:-validate-only}" docker-compose -f docker/compose.yaml config -q
"$dclint" --no-color -c docker/.dclintrc --max-warnings 0 docker/compose.yaml
"$hadolint" --no-color docker/Dockerfile docker/Dockerfile.gpu
echo "validate_compose: docker/compose.yaml and the Dockerfiles are valid (docker-compose $(docker-compose version --short), dclint $("$dclint" --version), $("$hadolint" --version))"
