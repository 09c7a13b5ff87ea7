"""LLM-as-judge and the weighted ensemble."""

import pytest

from reward.ensemble import WeightedEnsemble
from reward.judge import LLMJudge, parse_verdict


class CannedBackend:
    """A generation backend that replies with canned judge verdicts and records the requests."""

    def __init__(self, replies):
        self.replies, self.requests = list(replies), []

    def generate(self, prompts, n, sampling):
        self.requests.extend(prompts)
        assert sampling.temperature == 0 and n == 1
        return [[{"text": self.replies.pop(0)}] for _ in prompts]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Good. Score: 7", 7.0),
        ("score=9", 9.0),
        ("Rating: **4**", 4.0),
        ("[[2]]", 2.0),
        ("I give it 8/10.", 8.0),
        ("Score: 3 ... on reflection, Score: 6", 6.0),  # the last verdict counts
        ("Score: 11", None),
        ("It is fine.", None),
        ("", None),
    ],
)
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply, 1, 10) == expected


def test_judge_maps_scores_to_unit_range_and_none_when_unparseable():
    backend = CannedBackend(["Score: 10", "Score: 1", "no verdict here"])
    judge = LLMJudge(backend=backend)
    prompts = [{"messages": [{"role": "user", "content": f"q{i}"}]} for i in range(3)]
    assert judge(prompts, ["a", "b", "c"]) == [1.0, 0.0, None]
    assert "q0" in backend.requests[0][0]["content"] and "[Answer]\na" in backend.requests[0][0]["content"]


def test_judge_rubric_must_hold_the_prompt_and_response():
    with pytest.raises(ValueError, match="response"):
        LLMJudge(backend=CannedBackend([]), rubric="Rate {prompt}")


def test_judge_on_a_real_tiny_model_returns_scores_or_none(tiny_model_dir):
    judge = LLMJudge(model=str(tiny_model_dir), max_new_tokens=8)
    out = judge([{"messages": [{"role": "user", "content": "hi"}]}], ["hello"])
    assert len(out) == 1 and (out[0] is None or 0.0 <= out[0] <= 1.0)


def test_weighted_ensemble_renormalises_missing_components():
    a = lambda p, r: [1.0, None, None]  # noqa: E731
    b = lambda p, r: [0.0, 1.0, None]  # noqa: E731
    ens = WeightedEnsemble({"a": a, "b": b}, {"a": 3.0})
    assert ens([{}] * 3, ["x", "y", "z"]) == [3.0, 4.0, None]  # 3*1 + 1*0; b alone scaled to full weight 4
    strict = WeightedEnsemble({"a": a, "b": b}, require_all=True)
    assert strict([{}] * 3, ["x", "y", "z"]) == [1.0, None, None]


def test_weighted_ensemble_rejects_weights_for_unknown_rewards():
    with pytest.raises(ValueError, match="unknown rewards"):
        WeightedEnsemble({"a": lambda p, r: r}, {"b": 1.0})
