"""Time and memory of semantic dedup (clustering + greedy keep, `reward.dedup.semantic_dedup`) by set size.

    OMP_NUM_THREADS=1 python bench/semantic_dedup.py [--sizes 10000 50000 100000] [--layout topics|uniform]

Embeddings are synthetic unit vectors (dim 384, as MiniLM's): by default `topics`, one random topic centre per
100 rows with rows scattered around it (cosine about 0.6 to their centre, about 0.35 to each other), or
`uniform` on the sphere (no structure at all: the hardest case for clustering). 5% of the rows are planted
near-duplicates of other rows (cosine about 0.95); the dedup threshold is 0.9. Each size runs in a fresh
subprocess: `RSS before` is its resident memory after importing torch and building the embeddings, `peak RSS`
its high-water mark during the dedup (Linux: the mark is reset through /proc/self/clear_refs just before), and
`extra` the difference, what clustering and greedy keep added.
`found` is the share of planted pairs of which one row was removed; `other removed` counts removals of rows
that were not planted. No embedding model runs here (see SemanticDedup for that part).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

DIM, THRESHOLD, PLANTED, ROWS_PER_TOPIC = 384, 0.9, 0.05, 100


def synthetic(n: int, layout: str, seed: int = 0):
    """(unit vectors (n, DIM), planted pairs [(original, copy)]): the last PLANTED * n rows are the copies."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    n_copies = int(n * PLANTED)
    base = n - n_copies
    if layout == "topics":
        centres = F.normalize(torch.randn(max(1, base // ROWS_PER_TOPIC), DIM, generator=g), dim=-1)
        topic = torch.randint(len(centres), (base,), generator=g)
        x = F.normalize(centres[topic] + 1.33 * F.normalize(torch.randn(base, DIM, generator=g), dim=-1), dim=-1)
    else:
        x = F.normalize(torch.randn(base, DIM, generator=g), dim=-1)
    originals = torch.randperm(base, generator=g)[:n_copies]
    noise = 0.33 * F.normalize(torch.randn(n_copies, DIM, generator=g), dim=-1)  # cosine ~ 1/sqrt(1 + 0.33^2)
    copies = F.normalize(x[originals] + noise, dim=-1)
    return torch.cat([x, copies]), list(zip(originals.tolist(), range(base, n)))


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (high-water mark) of this process in MB, from /proc (ru_maxrss if unavailable)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(n: int, layout: str) -> dict:
    import torch

    from reward.dedup import semantic_dedup

    x, planted = synthetic(n, layout)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()  # random quality x difficulty
    rss_before = _rss_mb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM so the peak below belongs to the dedup, not to building the data
    except OSError:
        pass
    start = time.perf_counter()
    removed, info = semantic_dedup(x, order, THRESHOLD)
    seconds = time.perf_counter() - start
    in_pairs = {i for pair in planted for i in pair}
    found = sum((a in removed) != (b in removed) for a, b in planted)
    return {
        "rows": n, "seconds": seconds, "rss_before_mb": rss_before,
        "peak_rss_mb": _rss_mb("VmHWM"),
        "clusters": info["clusters"], "largest": info["largest_cluster"], "removed": len(removed),
        "found": found / len(planted), "other_removed": len(set(removed) - in_pairs),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--layout", choices=["topics", "uniform"], default="topics")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size, JSON on stdout
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.layout)))
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    print(f"semantic dedup, {args.layout} embeddings, dim {DIM}, threshold {THRESHOLD}, {PLANTED:.0%} planted, "
          f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print(f"{'rows':>8} {'seconds':>8} {'RSS before':>11} {'peak RSS':>9} {'extra':>7} {'clusters':>9} "
          f"{'largest':>8} {'removed':>8} {'found':>6} {'other removed':>14}")
    for n in args.sizes:
        cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--layout", args.layout]
        r = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout)
        print(f"{r['rows']:>8} {r['seconds']:>8.1f} {r['rss_before_mb']:>8.0f} MB {r['peak_rss_mb']:>6.0f} MB "
              f"{r['peak_rss_mb'] - r['rss_before_mb']:>4.0f} MB {r['clusters']:>9} {r['largest']:>8} "
              f"{r['removed']:>8} {r['found']:>6.1%} {r['other_removed']:>14}")


if __name__ == "__main__":
    main()
