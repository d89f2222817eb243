#!/usr/bin/env bash
# The GPU check (issue 22, items 6 and 7): the offline evaluation (with HyMiRec on the SmolLM2-135M
# LLM refiner too) and the online trainer on CUDA, where training runs under bf16 autocast, in one
# short run (sized for under 5 minutes on one GPU); both append their tables to
# benchmarks/RESULTS.md with the device beside the CPU rows there.
#
#   bash benchmarks/gpu_check.sh            # on a machine with CUDA (refuses to run without)
#   bash benchmarks/gpu_check.sh --smoke F  # the same commands at toy size on whatever device
#                                           # there is, tables to F (CI runs it on the CPU:
#                                           # tests/integration/test_gpu_check.py, slow)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ "${1:-}" = "--smoke" ]; then
  results=${2:?usage: gpu_check.sh --smoke RESULTS_FILE}
  "$PY" -m benchmarks.offline_eval --models sasrec --seeds 0 --epochs 1 \
    --multi-target 0 --results "$results"
  # The LLM refiner's path: 2 of SmolLM2's 30 blocks, 32 users, one epoch (~15 s on a CPU).
  "$PY" -m benchmarks.offline_eval --models --variants hymirec:refiner=llm,llm_layers=2 \
    --seeds 0 --epochs 1 --max-users 32 --multi-target 0 --results "$results"
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
# The paper's LLM backbone (issue 22, item 7): HyMiRec with the frozen SmolLM2-135M (LoRA r8 on
# every block's q/v) as its refiner, under bf16 autocast; one seed, at most 8 epochs (an estimate
# of ~1-2 minutes on an H100, not yet measured); its rows name the backbone.
"$PY" -m benchmarks.offline_eval --models --variants hymirec:refiner=llm --seeds 0 --epochs 8 \
  --patience 3 --batch-size 128 --multi-target 0
# The trainer on the ML-100K stream: samples/s and quality (part 1), freshness (part 2).
"$PY" -m benchmarks.online_training --models sasrec,hymirec --duration 60
