"""Inference cost per user against history length: full attention vs. cached long-history paths.

For histories of 50, 200, 1,000 and 4,000 items and batches of 1 and 32 users, on CPU:

- ``full attention``: SASRec (``model/sasrec.py``) over the whole history, the baseline whose cost
  grows with the square of the history length;
- ``HyMiRec encode_long``: the long history (all but the newest ``R`` items, as codebook codes)
  pooled into coarse interests, the part serving computes once per user and caches;
- ``HyMiRec refine (cached)``: the refined interests from cached coarse interests and the ``R``
  recent items, the part recomputed at every request;
- ``PerSRec uncached``: ``user_interests``, i.e. reading the old history into the tokens and then
  the recent items (about the cost of one full masked pass over ``old + k + R`` positions);
- ``PerSRec cached``: ``interests_from_cache`` with the tokens' per-layer states cached, only
  the ``R`` recent items recomputed.

Every model has the same width (64), 2 blocks of 2 heads, ``R = 50`` recent items, random weights
(cost does not depend on training) and a synthetic 1,682-item catalogue of the right shapes
(384-d text embeddings, 3 codebook levels of 255 codes). Latency per user is the median over
repeated calls of (call time / batch size) under ``torch.inference_mode``, with one torch thread
(the box is shared). Peak memory per user is the growth of the process's peak resident set size
during one call over its resident size just before it, divided by the batch size: measured in a
separate process whose malloc returns freed memory to the OS (``MALLOC_MMAP_THRESHOLD_=4096``),
after a warm-up call, with the peak mark reset through ``/proc/self/clear_refs`` (Linux) and read
as ``VmHWM``. It counts the activations and temporaries of the call, not the model weights or
the inputs; allocations the allocator serves from memory it already holds are invisible, so
values of a few KiB mean "below resolution", not "free".

Run from the repository root: ``python -m benchmarks.history_cost``. Prints a markdown table,
saves ``benchmarks/history_cost.png`` and appends the table, with the date and the machine, to
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from model.base import Batch, CatalogInfo

LENGTHS = (50, 200, 1000, 4000)
BATCHES = (1, 32)
PATHS = (
    "full attention",
    "HyMiRec encode_long",
    "HyMiRec refine (cached)",
    "PerSRec uncached",
    "PerSRec cached",
)
NUM_ITEMS = 1682
DIM, HEADS, LAYERS, RECENT, TOKENS = 64, 2, 2, 50, 4


@dataclass
class Cell:
    path: str
    length: int
    batch: int
    latency_ms: float = float("nan")  # per user
    peak_kib: float = float("nan")  # per user
    calls: int = 0


def synthetic_catalog(levels: int = 3, size: int = 255) -> CatalogInfo:
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(NUM_ITEMS + 1, 384, generator=gen), dim=-1)
    text[0] = 0.0
    codes = torch.randint(0, size, (NUM_ITEMS + 1, levels), generator=gen)
    codes[0] = size  # UNKNOWN
    centroids = F.normalize(torch.randn(levels, size, 384, generator=gen), dim=-1)
    scales = torch.rand(levels, size, generator=gen)
    genres = [frozenset[str]()] * (NUM_ITEMS + 1)
    return CatalogInfo(NUM_ITEMS, text, codes, centroids, scales, genres)


def make_call(path: str, length: int, batch: int) -> Callable[[], object]:
    """Build the model and inputs for one cell; return the call to time."""
    torch.manual_seed(0)
    catalog = synthetic_catalog()
    history = torch.randint(1, NUM_ITEMS + 1, (batch, length))
    zeros = torch.zeros(batch, 1, dtype=torch.long)
    users = Batch(torch.arange(batch), history, torch.zeros_like(history), zeros, zeros)
    if path == "full attention":
        from model import sasrec

        config = sasrec.Config(dim=DIM, heads=HEADS, layers=LAYERS, max_len=length, dropout=0.0)
        full = sasrec.build_model(catalog, config).eval()
        return lambda: full.user_interests(users)
    if path.startswith("HyMiRec"):
        from model import hymirec_model as hymirec

        hy = hymirec.HyMiRec(
            catalog,
            hymirec.Config(dim=DIM, heads=HEADS, layers=LAYERS, recent_len=RECENT, dropout=0.0),
        ).eval()
        long, recent = hy.split_history(history)
        long_codes = hy.codes[long]
        if path == "HyMiRec encode_long":
            return lambda: hy.encode_long(long_codes)
        with torch.inference_mode():
            coarse = hy.encode_long(long_codes)
        return lambda: hy.refine(coarse, recent)
    from model import persrec

    config_p = persrec.Config(
        dim=DIM,
        heads=HEADS,
        layers=LAYERS,
        num_tokens=TOKENS,
        recent_len=RECENT,
        max_len=max(length, RECENT + 1),
        dropout=0.0,
    )
    per = persrec.build_model(catalog, config_p).eval()
    if path == "PerSRec uncached":
        return lambda: per.user_interests(users)
    old, recent_items = per.split_history(history)
    with torch.inference_mode():
        cache = per.encode_old(old)
    return lambda: per.interests_from_cache(cache, recent_items)


def _kib(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` figure of this process, KiB (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_kib_per_user(cells: list[Cell]) -> list[float]:
    """Runs in a child started with ``MALLOC_MMAP_THRESHOLD_`` set low, so that freed tensors go
    back to the OS and RSS follows live memory. Per cell: warm up on one user, reset the peak-RSS
    mark (``/proc/self/clear_refs``, "5"), run the call, read the peak growth."""
    torch.set_num_threads(1)
    peaks = []
    for cell in cells:
        try:
            warmup = make_call(cell.path, cell.length, 1)
            call = make_call(cell.path, cell.length, cell.batch)
        except ImportError as exc:
            print(f"{cell.path}: not measured ({exc})", file=sys.stderr)
            peaks.append(float("nan"))
            continue
        with torch.inference_mode():
            warmup()
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")
            before = _kib("VmRSS")
            call()
            peaks.append(max(_kib("VmHWM") - before, 0) / cell.batch)
        del warmup, call
        gc.collect()
        print(
            f"{cell.path:>24} L={cell.length:>5} B={cell.batch:>2}: {peaks[-1]:10.1f} KiB/user",
            file=sys.stderr,
        )
    return peaks


def time_cell(cell: Cell, budget_s: float) -> None:
    """Median per-user latency; the first call is a warm-up unless it is slow (> 2 s)."""
    try:
        call = make_call(cell.path, cell.length, cell.batch)
    except ImportError as exc:
        print(f"{cell.path}: not measured ({exc})", file=sys.stderr)
        return
    with torch.inference_mode():
        start = time.perf_counter()
        call()
        first_s = time.perf_counter() - start
        times = [first_s] if first_s > 2.0 else []
        repeats = max(1 if times else 5, min(30, int(budget_s / max(first_s, 1e-4))))
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    cell.latency_ms = 1000 * statistics.median(times) / cell.batch
    cell.calls = len(times)
    print(
        f"{cell.path:>24} L={cell.length:>5} B={cell.batch:>2}: "
        f"{cell.latency_ms:9.3f} ms/user ({cell.calls} calls)",
        file=sys.stderr,
    )


def run_cells(lengths: tuple[int, ...], batches: tuple[int, ...], budget_s: float) -> list[Cell]:
    cells = [Cell(p, n, b) for b in batches for n in lengths for p in PATHS]
    # Memory in a separate process whose malloc returns every freed tensor to the OS.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "4096"
    try:
        with mp.get_context("spawn").Pool(1) as pool:
            peaks = pool.apply(peak_kib_per_user, (cells,))
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    torch.set_num_threads(1)
    for cell, peak in zip(cells, peaks, strict=True):
        cell.peak_kib = peak
        time_cell(cell, budget_s)
    return cells


def table(cells: list[Cell]) -> str:
    lines = [
        "| history | batch | path | latency ms/user | peak memory KiB/user | timed calls |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for c in sorted(cells, key=lambda c: (c.batch, c.length, PATHS.index(c.path))):
        latency = "not measured" if c.calls == 0 else f"{c.latency_ms:.3f}"
        memory = "not measured" if math.isnan(c.peak_kib) else f"{c.peak_kib:,.0f}"
        lines.append(f"| {c.length:,} | {c.batch} | {c.path} | {latency} | {memory} | {c.calls} |")
    return "\n".join(lines)


def plot(cells: list[Cell], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({c.batch for c in cells})
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for col, batch in enumerate(batches):
        for name in PATHS:
            mine = sorted(
                (c for c in cells if c.batch == batch and c.path == name and c.calls),
                key=lambda c: c.length,
            )
            if not mine:
                continue
            lengths = [c.length for c in mine]
            axes[0][col].plot(lengths, [c.latency_ms for c in mine], marker="o", label=name)
            axes[1][col].plot(lengths, [max(c.peak_kib, 1.0) for c in mine], marker="o", label=name)
        axes[0][col].set_title(f"latency per user, batch {batch}")
        axes[0][col].set_ylabel("ms / user (median)")
        axes[1][col].set_title(f"peak RSS growth per user, batch {batch}")
        axes[1][col].set_ylabel("KiB / user")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("history length (items)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Inference cost vs history length (CPU, 1 thread, random weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/history_cost.png"))
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--budget-s", type=float, default=6.0, help="timing budget per cell")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args(argv)
    from benchmarks.report import append_section, machine

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    started = dt.datetime.now(dt.UTC)
    wall = time.perf_counter()

    cells = run_cells(tuple(args.lengths), tuple(args.batches), args.budget_s)
    markdown = table(cells)
    print(markdown)
    plot(cells, args.plot)

    command = " ".join(["python -m benchmarks.history_cost", *(argv or sys.argv[1:])])
    load_after = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    section = (
        f"\n## History cost — {started:%Y-%m-%d %H:%M} UTC — {machine()}\n\n"
        f"Command: `{command}` ({time.perf_counter() - wall:.0f} s; plot `{args.plot}`)\n\n"
        f"Inference cost per user against history length, CPU, torch {torch.__version__}, "
        "1 torch thread, random weights, synthetic 1,682-item catalogue. All models: width 64, "
        "2 blocks x 2 heads, R = 50 recent items; PerSRec k = 4 tokens. `full attention` is "
        "SASRec over the whole history; `HyMiRec encode_long` and `PerSRec uncached` are the "
        "once-per-user parts, `HyMiRec refine (cached)` and `PerSRec cached` the per-request "
        "parts with the long-history state cached. Latency: median over the timed calls of call "
        "time / batch (a warm-up call first unless one call takes > 2 s). Memory: growth of the "
        "peak RSS (`VmHWM`, reset via `/proc/self/clear_refs`) over the RSS before one call, "
        "after a warm-up, in a process with `MALLOC_MMAP_THRESHOLD_=4096` so freed tensors "
        "leave the RSS; activations and temporaries only (no weights), per user; a few KiB "
        "means below resolution. Load average (1/5/15 min) at start: "
        f"{load}; at end: {load_after}.\n\n{markdown}\n"
    )
    if not args.no_append:
        append_section(args.results, section)


if __name__ == "__main__":
    main()
