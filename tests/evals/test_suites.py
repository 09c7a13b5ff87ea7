"""Eval suites on hand-made answers: win rate and its interval, drift statistics, verifiable accuracy, and the
held-out overlap check."""

import json

import pytest

from data_gen.prompts import load_prompts
from evals.stage import EvalContext, check_heldout, eval_stage
from evals.suites import Drift, RewardSuite, VerifiableAccuracy, WinRate, distinct_n, pearson, wilson_interval, win_rate
from posttrain.config import EvalConfig, EvalJob
from posttrain.errors import PosttrainError


def char_length(prompts, responses):
    return [float(len(r)) for r in responses]


def _row(pid: str, text: str, tokens: int | None = None, finish: str = "stop") -> dict:
    return {"prompt_id": pid, "messages": [{"role": "user", "content": f"question {pid}"}], "meta": "{}",
            "text": text, "completion_tokens": len(text.split()) if tokens is None else tokens,
            "finish_reason": finish}


def _ctx(tmp_path, responses, previous=None, teacher=None, rewards=None, generate=None, training=(), round0=None):
    return EvalContext(round=1, policy="unused", responses=responses, previous=previous, teacher=teacher,
                       rewards={"len": char_length} if rewards is None else rewards, generate=generate,
                       out=tmp_path, training_prompts=list(training), suite="suite", round0=round0)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_win_rate_and_wilson_interval_on_a_hand_made_case():
    mine = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.3, 0.1, 0.0, None]
    theirs = [0.1, 0.2, 0.3, 0.4, 0.45, 0.35, 0.3, 0.3, 0.2, 0.5, 0.7]
    r = win_rate(mine, theirs)
    # 6 wins, 2 ties, 2 losses, 1 unscored: win rate (6 + 2/2) / 10 = 0.7. Wilson, z = 1.959964, n = 10:
    # centre (0.7 + z^2/20) / (1 + z^2/10) = 0.644493; half-width z * sqrt(0.7*0.3/10 + z^2/400) / 1.384146
    # = 0.247715; so [0.396778, 0.892209].
    assert (r["wins"], r["ties"], r["losses"], r["unscored"], r["n"]) == (6, 2, 2, 1, 10)
    assert r["win_rate"] == pytest.approx(0.7)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.396778, 0.892209), abs=1e-6)
    # A margin turns near-equal scores into ties: 0.5 vs 0.45 and 0.4 vs 0.35 now tie.
    r = win_rate(mine, theirs, tie_margin=0.06)
    assert (r["wins"], r["ties"], r["losses"], r["win_rate"]) == (4, 4, 2, pytest.approx(0.6))
    # A wider confidence gives a wider interval; all wins stays inside [0, 1] and below 1.
    assert wilson_interval(7, 10, 0.99)[0] < 0.396778
    low, high = wilson_interval(5, 5)
    assert 0 < low < 1 and high == pytest.approx(1.0)
    assert win_rate([None], [1.0])["win_rate"] is None


def test_win_rate_suite_matches_prompts_and_skips_previous_in_round_0(tmp_path):
    responses = [_row("a", "long answer"), _row("b", "ab"), _row("c", "same")]
    previous = [_row("c", "diff"), _row("a", "short"), _row("z", "not in this round")]
    metrics = WinRate(reward="len", against=["previous"])(_ctx(tmp_path, responses, previous=previous))
    # a: 11 vs 5 chars, a win; c: 4 vs 4, a tie; b and z have no counterpart.
    assert (metrics["vs_previous.wins"], metrics["vs_previous.ties"], metrics["vs_previous.losses"]) == (1, 1, 0)
    assert metrics["vs_previous.n"] == 2 and metrics["vs_previous.win_rate"] == 0.75
    assert WinRate(against=["previous"])(_ctx(tmp_path, responses)) == {}  # round 0: no previous policy
    with pytest.raises(PosttrainError, match="no teacher answers"):
        WinRate(against=["teacher"])(_ctx(tmp_path, responses))
    with pytest.raises(PosttrainError, match="unknown"):
        WinRate(against=["parent"])


def test_win_rate_against_round_0(tmp_path):
    responses = [_row("a", "longer"), _row("b", "xy")]
    start, previous = [_row("a", "ab"), _row("b", "abc")], [_row("a", "abcdefgh"), _row("b", "x")]
    metrics = WinRate(reward="len", against=["previous", "round0"])(
        _ctx(tmp_path, responses, previous=previous, round0=start))
    assert (metrics["vs_round0.wins"], metrics["vs_round0.losses"], metrics["vs_round0.win_rate"]) == (1, 1, 0.5)
    assert (metrics["vs_previous.wins"], metrics["vs_previous.losses"]) == (1, 1)
    assert WinRate(against=["round0"])(_ctx(tmp_path, responses)) == {}  # round 0 itself


def test_reward_suite_summarises_each_reward(tmp_path):
    responses = [_row("a", "x" * 10, tokens=1), _row("b", "x" * 20, tokens=2), _row("c", "x" * 30, tokens=3)]
    metrics = RewardSuite()(_ctx(tmp_path, responses))
    assert metrics["len.mean"] == 20.0 and metrics["len.p50"] == 20.0 and metrics["len.count"] == 3
    assert metrics["len.none"] == 0 and metrics["len.corr_length"] == pytest.approx(1.0)


def test_drift_statistics(tmp_path):
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b) (b a) (a b) | (a b)
    assert pearson([1, 2, None, 3], [2, 4, 5, 6]) == pytest.approx(1.0) and pearson([1, 1], [2, 3]) is None
    responses = [
        _row("a", "I\u2019m sorry, I can't do that", tokens=8),
        _row("b", "the cat sat", tokens=3),
        _row("c", "the cat sat on the mat today", tokens=9, finish="length"),
        _row("d", "Paris", tokens=1),
    ]
    m = Drift()(_ctx(tmp_path, responses))
    assert m["refusal_rate"] == 0.25  # the curly apostrophe counts too
    assert m["mean_tokens"] == 5.25 and m["mean_words"] == (8 + 3 + 7 + 1) / 4  # IFEval words: "I’m" is 2
    assert m["truncated_rate"] == 0.25
    assert m["distinct_1"] == pytest.approx(13 / 17)  # 17 words; "the" thrice, "cat" and "sat" twice
    lengths = [float(len(r["text"])) for r in responses]  # the `len` reward
    assert m["corr_reward_length"] == pytest.approx(pearson(lengths, [8, 3, 9, 1]))
    assert "corr_reward_length" not in Drift()(_ctx(tmp_path, responses, rewards={}))


def test_verifiable_accuracy_scores_its_own_prompt_set(tmp_path):
    prompts = _jsonl(tmp_path / "math.jsonl", [
        {"id": "m1", "prompt": "What is 2 + 2?", "answer": "4"},
        {"id": "m2", "prompt": "What is 3 * 3?", "answer": "9"},
        {"id": "m3", "prompt": "What is 5 + 5?", "answer": "#### 10"},
        {"id": "m4", "prompt": "Say hi."},
    ])
    canned = {"What is 2 + 2?": "The answer is 4.", "What is 3 * 3?": "The answer is 8.",
              "What is 5 + 5?": "5 + 5 = 10\n#### 10", "Say hi.": "hi"}

    def generate(messages):
        return [{"text": canned[m[-1]["content"]], "completion_tokens": 3, "finish_reason": "stop"} for m in messages]

    suite = VerifiableAccuracy(prompts=prompts, verifier={"_target_": "reward.verifiers.MathAnswer"})
    ctx = _ctx(tmp_path, [], generate=generate)
    assert suite(ctx) == {"accuracy": pytest.approx(2 / 3), "fully_correct": pytest.approx(2 / 3), "n": 3,
                          "unscored": 1}
    kept = [json.loads(line) for line in open(tmp_path / "suite" / "answers.jsonl")]
    assert [(k["prompt_id"], k["score"]) for k in kept] == [("m1", 1.0), ("m2", 0.0), ("m3", 1.0), ("m4", None)]
    training = _jsonl(tmp_path / "train.jsonl", [{"id": "t9", "prompt": "what is 3*3"}])
    with pytest.raises(PosttrainError, match="'m2' has the text of training prompt 't9'"):
        suite(_ctx(tmp_path, [], generate=generate, training=[training]))


def test_overlap_with_training_prompts_is_an_error(tmp_path):
    heldout = load_prompts(_jsonl(tmp_path / "heldout.jsonl", [
        {"id": "h1", "prompt": "Why is the sky blue?"},
        {"id": "h2", "prompt": "Name a prime number."},
        {"id": "h3", "prompt": "Describe the sea."},
    ])).prompts
    training = _jsonl(tmp_path / "train.jsonl", [
        {"id": "t1", "prompt": "why is the  SKY blue"},  # same words: case, spacing, punctuation differ
        {"id": "h2", "prompt": "Something else entirely."},  # same id
        {"id": "t3", "prompt": "Describe the sea in one sentence."},  # different text
    ])
    with pytest.raises(PosttrainError) as err:
        check_heldout(heldout, [training])
    message = str(err.value)
    assert "2 of 3 held-out prompts overlap" in message
    assert "'h1' has the text of training prompt 't1'" in message and "id 'h2'" in message
    assert "h3" not in message
    check_heldout(heldout[2:], [training])  # disjoint: fine

    # The eval stage checks before loading any model.
    job = EvalJob(evals=EvalConfig(suites={}), round=1, training_prompts=[training])
    with pytest.raises(PosttrainError, match="overlap"):
        eval_stage(job, {"policy": "/no/such/model", "heldout": str(tmp_path / "heldout.jsonl")}, tmp_path)


def test_win_rate_is_judged_by_the_primary_reward_unless_the_suite_names_one(tmp_path):
    rows, before = [_row("a", "a long answer here")], [_row("a", "short")]
    rewards = {"len": char_length, "brief": lambda p, r: [-float(len(t)) for t in r]}
    ctx = _ctx(tmp_path, rows, previous=before, rewards=rewards)
    ctx.primary = "brief"  # longer than before: a loss by the primary reward
    assert WinRate(against=["previous"])(ctx)["vs_previous.win_rate"] == 0.0 and ctx.judged_by == {"suite": "brief"}
    ctx.primary = None  # no primary: the first eval reward, by which it is a win
    assert WinRate(against=["previous"])(ctx)["vs_previous.win_rate"] == 1.0 and ctx.judged_by == {"suite": "len"}
    ctx.primary = "brief"  # a reward named by the suite wins over the primary
    assert WinRate(reward="len", against=["previous"])(ctx)["vs_previous.win_rate"] == 1.0
    assert ctx.judged_by == {"suite": "len"}


def test_ifeval_prompt_and_instruction_level_accuracy(tmp_path):
    from evals.suites import IFEvalAccuracy

    words = {"type": "max_words", "n": 3}
    rows = [
        {**_row("a", "no commas here"), "meta": json.dumps({"constraints": [words, {"type": "no_commas"}]})},
        {**_row("b", "one, two, three, four"), "meta": json.dumps({"constraints": [words, {"type": "no_commas"}]})},
        {**_row("c", "one, two"), "meta": json.dumps({"constraints": [words]})},
        {**_row("d", "anything"), "meta": "{}"},  # no constraints: not counted
    ]
    m = IFEvalAccuracy()(_ctx(tmp_path, rows))
    assert m == {"prompt_level": 2 / 3, "instruction_level": 3 / 5, "prompts": 3, "instructions": 5}
    rows.append({**_row("e", "Sure, fine"), "meta": json.dumps({"constraints": [{"type": "no_commas"}]})})
    brevity_free = IFEvalAccuracy(without=["max_words"])(_ctx(tmp_path, rows))
    assert brevity_free == {"prompt_level": 0.0, "instruction_level": 0.0, "prompts": 1, "instructions": 1}


def test_win_rate_needs_no_judge_when_there_is_no_opponent(tmp_path):
    assert WinRate(against=["previous", "round0"])(_ctx(tmp_path, [_row("a", "x")], rewards={})) == {}
