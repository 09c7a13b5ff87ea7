"""What every generation backend is: `generate(prompts, n, sampling) -> n completions per prompt`.

The local `hf` backend (data_gen/hf_backend.py), vLLM (data_gen/vllm_backend.py) and OpenAI-compatible endpoints
(data_gen/openai_backend.py) all follow this Protocol; so can a user's own class, named by `_target_` in a
recipe (`generate.backend`, `evals.backend`, a judge's `backend`) and built with `model=<spec>`. This module imports
nothing heavy, so a reward that drives a backend (reward/judge.py) does not load torch to name its sampling.

Two optional class attributes: `remote = True` says `model` is a name a server knows, not a local spec (validation
does not look for it on disk); `unhashed` names constructor arguments that say where and how to reach the model,
not what it computes (URLs, keys, retries, concurrency): they are left out of the stage's hash, so changing them
keeps a stage's finished work.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one generate call. `temperature=0` is greedy; `seed` makes a call repeatable.
    `top_logprobs` > 0 asks for the model's top-k next-token log-probs at every generated token
    (data_gen/logprobs.py: `completion_ids`, `topk_ids`, `topk_logprobs` in each sample)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    top_logprobs: int = 0


class PromptsRejected(RuntimeError):
    """Raised by `generate` when the model's server refused some prompts for themselves (too long, filtered) and
    answered every other one: `results` has None at the refused prompts, `rejected` maps their index to the
    reason. The generate stage quarantines those prompts and goes on."""

    def __init__(self, results: list, rejected: dict[int, str]):
        self.results, self.rejected = results, rejected
        first = min(rejected)
        super().__init__(f"{len(rejected)} of {len(results)} prompts rejected by the server; prompt {first}: "
                         f"{rejected[first]}")


def build_backend(cfg: dict, model: str, journal_dir: str | None = None) -> Backend:
    """A backend from its `_target_` config, built with `model` (and `journal_dir`, for a class that takes one:
    paid endpoints journal every finished prompt there, so a crash redoes none). Any backend but the hf one
    drops the model the driver kept (posttrain.models.keeping_models) first."""
    import inspect

    from hydra.utils import get_object, instantiate

    from posttrain.models import release_models

    cls, extra = get_object(cfg["_target_"]), {}
    hf = sys.modules.get("data_gen.hf_backend")  # not imported: nothing was kept for it
    if hf is None or not (isinstance(cls, type) and issubclass(cls, hf.HFBackend)):
        release_models()  # a model kept for the hf backend (posttrain.models.keeping_models) is of no use to it
    if journal_dir is not None and "journal_dir" in inspect.signature(cls).parameters:
        extra["journal_dir"] = journal_dir
    return instantiate(cfg, model=model, _convert_="all", **extra)


@runtime_checkable
class Backend(Protocol):
    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[dict]]:
        """`n` completions for each chat prompt (a list of message dicts). Each completion is a dict with at
        least `text`, `prompt_tokens`, `completion_tokens` and `finish_reason` ("stop" or "length")."""
        ...
