"""LLM-as-judge: any generation backend (the teacher, say) rates responses against a rubric."""

from __future__ import annotations

import re
from typing import Any

from hydra.utils import instantiate

from data_gen.backend import PromptsRejected, Sampling

DEFAULT_RUBRIC = """Rate the assistant's answer to the user's request for helpfulness, correctness and clarity.

[Request]
{prompt}

[Answer]
{response}

Reply with a short justification, then a final line of the form "Score: N" where N is an integer from \
{low} to {high}."""

# The verdict is the last score-like token in the judge's reply; the forms below are the ones judges produce.
_PATTERNS = [
    r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)",
    r"rating\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)",
    r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]",
    r"(-?\d+(?:\.\d+)?)\s*/\s*(?:10|5|100)\b",
]


def parse_verdict(text: str, low: float, high: float) -> float | None:
    """The judge's score in [low, high] from its reply, or None when there is none or it is out of range.

    >>> parse_verdict("Clear and right. Score: 8", 1, 10)
    8.0
    >>> parse_verdict("I'd say [[3]] at most", 1, 10)
    3.0
    >>> parse_verdict("Score: 12", 1, 10) is None, parse_verdict("no idea", 1, 10) is None
    (True, True)
    """
    found: list[tuple[int, float]] = []
    for pattern in _PATTERNS:
        for m in re.finditer(pattern, text, flags=re.IGNORECASE):
            found.append((m.start(), float(m.group(1))))
    if not found:
        return None
    value = max(found)[1]  # the last one written
    return value if low <= value <= high else None


def _render_prompt(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class LLMJudge:
    """Reward from a judge model. `backend` is a generation backend object, or its `_target_` config, built
    with `model`. Scores are mapped to [0, 1] (`(score - low) / (high - low)`); an unparseable verdict is None.
    Judging is greedy (temperature 0) so a rerun gives the same scores."""

    def __init__(
        self,
        model: str | None = None,
        backend: Any = None,
        rubric: str = DEFAULT_RUBRIC,
        low: int = 1,
        high: int = 10,
        max_new_tokens: int = 128,
    ):
        if backend is None or isinstance(backend, dict):
            cfg = backend or {"_target_": "data_gen.hf_backend.HFBackend"}
            if model is None:
                raise ValueError("LLMJudge needs `model` (a model spec) to build its backend")
            backend = instantiate(cfg, model=model, _convert_="all")
        for field in ("{prompt}", "{response}"):
            if field not in rubric:
                raise ValueError(f"LLMJudge rubric must contain {field}")
        self.backend, self.rubric, self.low, self.high = backend, rubric, low, high
        self.max_new_tokens = max_new_tokens

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        requests = [
            [{"role": "user", "content": self.rubric.format(
                prompt=_render_prompt(p["messages"]), response=r, low=self.low, high=self.high)}]
            for p, r in zip(prompts, responses)
        ]
        try:
            replies = self.backend.generate(requests, 1, Sampling(temperature=0, max_new_tokens=self.max_new_tokens))
        except PromptsRejected as e:  # e.g. a response too long for the judge's context: unscored, not fatal
            replies = [r if r is not None else [{"text": ""}] for r in e.results]
        out: list[float | None] = []
        for (reply,) in replies:
            v = parse_verdict(reply["text"], self.low, self.high)
            out.append(None if v is None else (v - self.low) / (self.high - self.low))
        return out
