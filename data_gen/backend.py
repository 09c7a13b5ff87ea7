"""What every generation backend is: `generate(prompts, n, sampling) -> n completions per prompt`.

The local `hf` backend (data_gen/hf_backend.py), vLLM (data_gen/vllm_backend.py) and OpenAI-compatible endpoints
(data_gen/openai_backend.py) all follow this Protocol; so can a user's own class, named by `_target_` in a
recipe (`generate.backend`, `evals.backend`, a judge's `backend`) and built with `model=<spec>`. This module imports
nothing heavy, so a reward that drives a backend (reward/judge.py) does not load torch to name its sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generate call. `temperature=0` is greedy; `seed` makes a call repeatable."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@runtime_checkable
class Backend(Protocol):
    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[dict]]:
        """`n` completions for each chat prompt (a list of message dicts). Each completion is a dict with at
        least `text`, `prompt_tokens`, `completion_tokens` and `finish_reason` ("stop" or "length")."""
        ...
