#!/usr/bin/env bash
# The GPU check (issue 22, item 6): the offline evaluation and the online trainer on CUDA, where
# training runs under bf16 autocast, in one short run (sized for under 5 minutes on one GPU);
# both append their tables to benchmarks/RESULTS.md with the device beside the CPU rows there.
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA (refuses to run without)
#   bash benchmarks/gpu_check.sh --smoke F  # the same two commands at toy size on whatever device
#                                           # there is, tables to F (CI runs it on the CPU:
#                                           # tests/integration/test_gpu_check.py, slow)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "--smoke" ]; then
  results=${2:?usage: gpu_check.sh --smoke RESULTS_FILE}
  "$PY" -m benchmarks.offline_eval --models sasrec --seeds 0 --epochs 1 \
    --multi-target 0 --results "$results"
  "$PY" -m benchmarks.online_training --models sasrec --skip-freshness --max-samples 3000 \
    --results "$results"
  exit 0
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device here; --smoke FILE runs the CPU path" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Every transition-based model at the issue's budget (30 epochs, patience 5), 3 seeds.
"$PY" -m benchmarks.offline_eval --models sasrec hstu hymirec --seeds 0 1 2 --epochs 30 \
  --patience 5 --batch-size 128
# The trainer on the ML-100K stream: samples/s and quality (part 1), freshness (part 2).
"$PY" -m benchmarks.online_training --models sasrec,hymirec --duration 60
