"""The score stage: every reward on every row; failures and NaN quarantined and counted, the run goes on."""

import json
import math

import datasets
import pytest

from posttrain.config import RewardConfig
from posttrain.errors import PosttrainError
from reward.score import score, score_rows, summarize


def length_reward(prompts, responses):
    return [float(len(r)) for r in responses]


def flaky_reward(prompts, responses):
    """Raises on any batch that holds the word 'boom', returns NaN for 'nan' and None for 'skip'."""
    if any("boom" in r for r in responses):
        raise RuntimeError("boom")
    return [math.nan if r == "nan" else None if r == "skip" else 1.0 for r in responses]


def needs_answer(prompts, responses):
    return [float(r == p["answer"]) if "answer" in p else None for p, r in zip(prompts, responses)]


def test_failing_rows_are_isolated_and_quarantined():
    responses = ["ok", "boom", "nan", "skip", "fine"]
    scores, quarantine = score_rows("flaky", flaky_reward, [{}] * 5, responses, batch_size=5)
    assert scores == [1.0, None, None, None, 1.0]
    reasons = [(q["row"], q["reason"].split(":")[0]) for q in quarantine]
    assert reasons == [(1, "RuntimeError"), (2, "not a finite number")]
    summary = summarize(scores, [1, 2, 3, 4, 5], quarantine)
    assert summary["count"] == 2 and summary["none"] == 3 and summary["quarantined"] == 2


def test_a_reward_returning_the_wrong_number_of_scores_is_an_error_naming_it():
    with pytest.raises(PosttrainError, match="reward 'short' returned 1 scores for 2 responses"):
        score_rows("short", lambda p, r: [1.0], [{}, {}], ["a", "b"], batch_size=2)


def test_summary_statistics_and_length_correlation():
    s = summarize([1.0, 2.0, 3.0, None], [10, 20, 30, 40], [])
    assert s["mean"] == 2.0 and s["p50"] == 2.0 and s["none"] == 1
    assert s["corr_length"] == pytest.approx(1.0)


def test_score_stage_adds_one_column_per_reward_and_the_primary(tmp_path):
    rows = [
        {"prompt_id": "a", "messages": [{"role": "user", "content": "2+2?"}], "meta": json.dumps({"answer": "4"}),
         "sample_idx": 0, "text": "4", "completion_tokens": 1},
        {"prompt_id": "a", "messages": [{"role": "user", "content": "2+2?"}], "meta": json.dumps({"answer": "4"}),
         "sample_idx": 1, "text": "boom", "completion_tokens": 1},
        {"prompt_id": "b", "messages": [{"role": "user", "content": "hi"}], "meta": "{}",
         "sample_idx": 0, "text": "hello", "completion_tokens": 1},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "gen"))
    cfg = RewardConfig(
        rewards={
            "exact": {"_target_": "tests.reward.test_score.needs_answer"},
            "flaky": {"_target_": "tests.reward.test_score.flaky_reward"},
        },
        primary="exact",
        batch_size=2,
    )
    out = tmp_path / "out"
    out.mkdir()
    result = score(cfg, {"generations": str(tmp_path / "gen")}, out)
    scored = datasets.load_from_disk(str(out / "scored"))
    assert scored["reward.exact"] == [1.0, 0.0, None]  # b has no reference answer: cannot score
    assert scored["reward.flaky"] == [1.0, None, 1.0]
    assert scored["score"] == scored["reward.exact"]
    assert scored["text"] == ["4", "boom", "hello"]  # saved beside the generations
    assert result.metrics["rewards"]["exact"]["none"] == 1
    assert result.metrics["quarantined"] == 1
    (q,) = [json.loads(line) for line in open(out / "quarantine.jsonl")]
    assert (q["reward"], q["prompt_id"], q["sample_idx"]) == ("flaky", "a", 1)


def scalar_reward(prompts, responses):
    return 1.0  # a common mistake: one number for the whole batch


def broken_reward(prompts, responses):
    raise KeyError("reference")  # misconfigured: every row fails the same way


@pytest.mark.parametrize("fn, message", [
    (scalar_reward, r"reward 'judge' returned float '1.0', not a list with one score per response"),
    (broken_reward, r"reward 'judge' fails on every row of a batch of 3 with the same error: KeyError: 'reference'"),
])
def test_a_reward_broken_for_every_row_stops_instead_of_quarantining(fn, message):
    with pytest.raises(PosttrainError, match=message):
        score_rows("judge", fn, [{}] * 5, ["a", "b", "c", "d", "e"], batch_size=3)


def test_score_stage_stops_on_a_scalar_reward_naming_it(tmp_path):
    rows = [{"prompt_id": "a", "messages": [{"role": "user", "content": "q"}], "meta": "{}", "sample_idx": i,
             "text": t, "completion_tokens": 1} for i, t in enumerate(["x", "y"])]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "gen"))
    cfg = RewardConfig(rewards={"judge": {"_target_": "tests.reward.test_score.scalar_reward"}})
    (tmp_path / "out").mkdir()
    with pytest.raises(PosttrainError, match="reward 'judge' returned float"):
        score(cfg, {"generations": str(tmp_path / "gen")}, tmp_path / "out")
    assert not (tmp_path / "out" / "scored").exists()


def test_a_reward_failing_every_row_stops_even_in_batches_of_one():
    with pytest.raises(PosttrainError, match="reward 'judge' fails on every row with the same error: KeyError"):
        score_rows("judge", broken_reward, [{}] * 3, ["a", "b", "c"], batch_size=1)
