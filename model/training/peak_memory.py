"""Peak memory while a block runs: the CUDA allocator's peak, or the sampled growth of the
process's resident memory (``model.training.offline`` reports it beside each run)."""

from __future__ import annotations

import os
import resource
import sys
import threading

import torch

__all__ = ["PeakMemory"]


class PeakMemory:
    """Peak memory while the block runs: CUDA allocator peak, or sampled process RSS growth."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_rss = 0

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, self._rss_bytes() - self._start_rss)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif os.path.exists("/proc/self/statm"):
            self._start_rss = self._rss_bytes()
            self.method = "RSS increase over start, sampled /proc/self/statm every 20 ms"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self._start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "resource.getrusage peak RSS increase (high-water mark)"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss_bytes() - self._start_rss)
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_bytes = (peak - self._start_rss) * scale
