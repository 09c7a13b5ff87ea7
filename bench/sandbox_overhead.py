"""Wall time per trivial program: posttrain's bubblewrap sandbox against a plain `python -c`, with 2 workers.

    python bench/sandbox_overhead.py              # 200 programs per variant, 3 rounds, 2 workers
    python bench/sandbox_overhead.py --programs 500 --workers 4

Variants, each running `programs` times the program `x = 1` through a thread pool of `workers`:
  plain        subprocess.run([python, "-c", "x = 1"]): what running a model's code costs with no sandbox at all
  sandbox      reward.sandbox.run_python("x = 1"): bwrap (namespaces, binds, tmpfs, seccomp), rlimits, the harness
  code_reward  CodeExecution on an MBPP-style answer with 3 asserts, judged outside the sandbox
The variants alternate, `--rounds` times, and each keeps its best round; the ratio is against `plain`.
The target: the sandbox costs at most 1.5x a plain `python -c` per trivial program.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from reward.sandbox import CodeExecution, _interpreter, run_python, sandbox_problem

ANSWER = "```python\ndef add(a, b):\n    return a + b\n```"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]


def plain(_):
    assert subprocess.run([_interpreter(), "-c", "x = 1"]).returncode == 0


def sandboxed(_):
    assert run_python("x = 1").returncode == 0


def code_reward(_):
    assert CodeExecution().score(TESTS, ANSWER) == 1.0


def timed(fn, programs: int, workers: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(fn, range(programs)))
    return (time.perf_counter() - start) / programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if sandbox_problem():
        sys.exit(f"no sandbox here: {sandbox_problem()}")
    variants = {"plain": plain, "sandbox": sandboxed, "code_reward": code_reward}
    timed(sandboxed, 4, 1)  # the one-off probe and bind list, outside the measurement
    best = {name: float("inf") for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            best[name] = min(best[name], timed(fn, args.programs, args.workers))
    print(f"{args.programs} programs per variant, {args.workers} workers, best of {args.rounds} rounds")
    for name, seconds in best.items():
        print(f"{name:12s} {seconds * 1000:7.1f} ms per program   {seconds / best['plain']:5.2f}x plain")


if __name__ == "__main__":
    main()
