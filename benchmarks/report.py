"""What every benchmark writes beside its figures: the machine, and an append to RESULTS.md."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["append_section", "device", "machine"]


def machine() -> str:
    """`uname -m`, usable cores (as nproc counts them) and the CPU model from /proc/cpuinfo."""
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, {model}"


def device() -> str:
    """Where torch computes here: the CUDA device's name (training uses bf16 autocast there) or
    the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, bf16 autocast)"
    return "cpu"


def append_section(path: Path, report: str) -> None:
    """Append in one write on an O_APPEND descriptor, so concurrent appenders cannot interleave."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# Benchmark results\n")
    text = path.read_text()  # re-read right before appending: start on a fresh line
    chunk = ("" if text.endswith("\n") else "\n") + "\n" + report
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, chunk.encode())
    finally:
        os.close(fd)
