"""The prepared GPU check's CPU path (``benchmarks/gpu_check.sh --smoke``): both of its
benchmarks run end to end at toy size, on the real broker and the real trainer, and each writes
its table with the device it ran on. On a CUDA machine the same script runs at full size."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT

# Slow: about 1.5 minutes on 2 CPU cores (one epoch of SASRec over ML-100K with its full-ranking
# evaluations, then 3,000 samples through the broker and the trainer), too much for the default
# run's budget; `bash scripts/test.sh --all` runs it.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]


def test_the_gpu_script_runs_its_cpu_path_and_records_the_device(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    run = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--smoke", str(results)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = results.read_text()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    offline, online = text.split("## Online trainer")
    assert f"device {device}" in offline and f"device {device}" in online
    # The offline table has SASRec's row, the online one the samples it learned (all 3,000).
    assert re.search(r"^\| sasrec \|", offline, re.M), offline
    row = re.search(r"^\| sasrec \| ([\d,]+) \|", online, re.M)
    assert row and int(row.group(1).replace(",", "")) == 3000, online
