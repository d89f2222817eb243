"""What a user sees first is the command's own output, not library warnings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_cli_hides_library_deprecation_warnings_even_with_warnings_on(tmp_path: Path) -> None:
    env = {**os.environ, "HYMIREC_DATA_DIR": str(tmp_path / "data")}
    env.pop("PYTHONWARNINGS", None)
    command = [sys.executable, "-W", "default", "-m", "hymirec.cli", "broker", "status"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr  # 3: "not running", as LSB status commands say
    assert done.stdout.startswith("broker stopped at "), done.stdout
    assert "Warning" not in done.stderr, done.stderr
    # the same import without the entry point's filter does warn (kafka-python's schemas), so
    # the check above is not vacuous
    bare = [sys.executable, "-W", "default", "-c", "import kafka"]
    warned = subprocess.run(bare, env=env, capture_output=True, text=True, timeout=120)
    assert "DeprecationWarning" in warned.stderr, warned.stderr
