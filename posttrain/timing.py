"""Where a stage's seconds go: `Phases` times named phases (load, train, save...) for the manifest, so the fixed
costs of a stage (process start, loading, saving) show beside the work it does."""

from __future__ import annotations

import time
from contextlib import contextmanager


class Phases:
    """`with phases("load"): ...` adds the block's wall time to phase "load"; `seconds()` gives them, rounded."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def seconds(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self._seconds.items()}

    def total(self) -> float:
        return sum(self._seconds.values())
