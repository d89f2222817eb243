"""How well the residual cosine codebook keeps MovieLens-100K item embeddings, per byte.

For each (levels, size) setting: fit on all 1,682 item embeddings (all-MiniLM-L6-v2, 384-d, seed 0),
encode the same catalogue (the codebook is fitted on the catalogue it serves), and report the
reconstruction cosine cos(x, decode(encode(x))) next to the bytes it costs. The baseline is what a
0-byte code gives: every item decoded as the catalogue's mean embedding.

Run from the repository root: ``python -m benchmarks.codebook_quality [--cache-dir DIR]``. Prints a
markdown table and appends it, with the date and the machine, to ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.report import append_section, machine
from features.codebook import ResidualCodebook
from features.item_embeddings import embed_movielens_items

SETTINGS = [(1, 64), (2, 64), (3, 64), (1, 256), (2, 256), (3, 256), (4, 256)]
FLOAT32_BYTES = 384 * 4


def measure(embeddings: np.ndarray, iters: int) -> list[dict[str, float]]:
    rows = []
    for levels, size in SETTINGS:
        start = time.perf_counter()
        codebook = ResidualCodebook.fit(embeddings, levels=levels, size=size, iters=iters, seed=0)
        fit_s = time.perf_counter() - start
        cosine = codebook.reconstruction_cosine(embeddings, codebook.encode(embeddings))
        rows.append(
            {
                "levels": levels,
                "size": size,
                "bytes": codebook.bytes_per_item,
                "ratio": FLOAT32_BYTES / codebook.bytes_per_item,
                "mean": float(cosine.mean()),
                "p5": float(np.quantile(cosine, 0.05)),
                "fit_s": fit_s,
            }
        )
        print(f"fitted L={levels} K={size} in {fit_s:.1f} s", file=sys.stderr)
    return rows


def table(rows: list[dict[str, float]], baseline: np.ndarray) -> str:
    lines = [
        "| levels | size | bytes/item | float32 bytes/item | compression | mean cos | p5 cos "
        "| fit s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| 0 | - | 0 | {FLOAT32_BYTES} | - | {baseline.mean():.4f} "
        f"| {np.quantile(baseline, 0.05):.4f} | - |",
    ]
    for row in rows:
        lines.append(
            f"| {row['levels']} | {row['size']} | {row['bytes']} | {FLOAT32_BYTES} "
            f"| {row['ratio']:.0f}x | {row['mean']:.4f} | {row['p5']:.4f} | {row['fit_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cache-dir", type=Path, default=Path(".hymirec/cache"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/RESULTS.md"))
    parser.add_argument("--iters", type=int, default=20, help="k-means iterations per level")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]  # timings on a shared 2-core box depend on what else runs

    start = time.perf_counter()
    item_ids, embeddings = embed_movielens_items(args.cache_dir)
    embed_s = time.perf_counter() - start
    mean = embeddings.mean(axis=0)
    baseline = embeddings @ mean / (np.linalg.norm(embeddings, axis=1) * np.linalg.norm(mean))
    rows = measure(embeddings, args.iters)

    command = " ".join(["python -m benchmarks.codebook_quality", *(argv or sys.argv[1:])])
    when = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    report = "\n".join(
        [
            f"## Codebook quality — {when} — {machine()}",
            "",
            f"Command: `{command}`",
            "",
            f"{len(item_ids)} MovieLens-100K items, all-MiniLM-L6-v2 text embeddings (384-d, "
            f"unit norm; ready in {embed_s:.1f} s, computed once and then cached). Balanced "
            f"k-means, {args.iters} iterations per level, seed 0; reconstruction cosine measured "
            "on the catalogue the codebook was fitted on. Row `0` is the 0-byte baseline: every "
            "item decoded as the mean embedding. Codes are uint8 for size <= 255, else uint16 "
            "(the value `size` is reserved for unknown items). 1-minute load average at start: "
            f"{load_before:.2f}; fit times are wall-clock seconds and vary with load.",
            "",
            table(rows, baseline),
            "",
        ]
    )
    print(report)
    append_section(args.results, report)


if __name__ == "__main__":
    main()
