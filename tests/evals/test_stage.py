"""The eval stage end to end on tiny models: round 0 (start policy + teacher) and round 1 through RunDir."""

import json

import datasets
import pytest

from evals.report import build_report
from posttrain.config import EvalConfig, EvalJob
from posttrain.rundir import RunDir
from recipes.loop import STAGES
from reward.ifeval import count_words


def words(prompts, responses):
    return [float(count_words(r)) for r in responses]


def chars(prompts, responses, scale=1.0):
    return [scale * len(r) for r in responses]


EVALS = EvalConfig(
    heldout="pkg://evals/data/tiny_heldout.jsonl",
    temperature=0.0,
    max_new_tokens=16,
    backend={"_target_": "data_gen.hf_backend.HFBackend", "batch_size": 12},
    rewards={"words": {"_target_": "tests.evals.test_stage.words"},
             "chars": {"_target_": "tests.evals.test_stage.chars", "scale": 0.5}},
    suites={
        "reward": {"_target_": "evals.suites.RewardSuite"},
        "win_rate": {"_target_": "evals.suites.WinRate", "reward": "words"},
        "drift": {"_target_": "evals.suites.Drift"},
        "math": {"_target_": "evals.suites.VerifiableAccuracy", "prompts": "pkg://evals/data/tiny_math.jsonl",
                 "verifier": {"_target_": "reward.verifiers.MathAnswer"}, "limit": 3},
        "ifeval": {"_target_": "evals.suites.VerifiableAccuracy", "prompts": "pkg://evals/data/tiny_ifeval.jsonl",
                   "verifier": {"_target_": "reward.verifiers.InstructionFollowing"}, "limit": 3},
    },
)
TRAINING = ["pkg://data_gen/prompts/tiny.jsonl"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    """Round 0 evaluates the tiny model and makes the teacher's answers (the same tiny model); round 1 evaluates
    another tiny model (seed 1) against round 0's saved answers and the saved teacher answers."""
    from posttrain.tiny import build_tiny

    other = build_tiny(tmp_path_factory.mktemp("tiny-seed1") / "model", seed=1)
    root = tmp_path_factory.mktemp("run")
    rd = RunDir(root, STAGES)
    try:
        in0 = {"policy": str(tiny_model_dir), "heldout": EVALS.heldout, "teacher": str(tiny_model_dir)}
        e0 = rd.run_stage(0, "eval", EvalJob(evals=EVALS, round=0, training_prompts=TRAINING), in0)
        in1 = {"policy": str(other), "heldout": EVALS.heldout, "previous": rd.output(e0, "responses"),
               "teacher_responses": rd.output(e0, "teacher_responses")}
        e1 = rd.run_stage(1, "eval", EvalJob(evals=EVALS, round=1, training_prompts=TRAINING), in1)
    finally:
        rd.close()
    return root, e0, e1


def _metrics(root, r):
    return json.loads((root / f"round_{r}" / "07_eval" / "metrics.json").read_text())


def test_eval_stage_writes_answers_and_metrics(tiny_run):
    root, e0, e1 = tiny_run
    assert set(e0["outputs"]) == {"responses", "metrics", "teacher_responses"}
    assert set(e1["outputs"]) == {"responses", "metrics"}
    m0, m1 = _metrics(root, 0), _metrics(root, 1)
    # The manifest carries the same numbers, and which reward judged the win rates (the first: no primary given).
    # and where its seconds went: round 0 also answers as the teacher
    assert set(e0["metrics"].pop("seconds")) == {"teacher", "answer", "score"}
    assert set(e1["metrics"].pop("seconds")) == {"answer", "score"}
    for entry in (e0, e1):  # rows and tokens answered per second, over the stage's shards
        throughput = entry["metrics"].pop("throughput")
        assert throughput["rows"] == 12 and throughput["shards"] == 1 and throughput["tokens"] > 0
        assert throughput["rows_per_s"] > 0 and throughput["processes"] == 1
    assert e0["metrics"] == {**m0, "judged_by": {"win_rate": "words"}} and e1["metrics"] == {**m1, "judged_by": {
        "win_rate": "words"}}
    assert list(m1) == ["reward", "win_rate", "drift", "math", "ifeval"]

    a0 = datasets.load_from_disk(str(root / e0["outputs"]["responses"]))
    a1 = datasets.load_from_disk(str(root / e1["outputs"]["responses"]))
    assert len(a0) == len(a1) == 12 and a0["prompt_id"] == a1["prompt_id"]
    assert a0["text"] != a1["text"]  # two different policies
    assert m1["reward"]["words.mean"] == pytest.approx(sum(a1["reward.words"]) / 12)
    assert m1["reward"]["chars.mean"] == pytest.approx(sum(0.5 * len(t) for t in a1["text"]) / 12)
    assert m1["drift"]["mean_tokens"] == pytest.approx(sum(a1["completion_tokens"]) / 12)

    # Round 0: the policy is the teacher, greedy: every prompt a tie; no previous policy yet.
    assert m0["win_rate"]["vs_teacher.ties"] == 12 and m0["win_rate"]["vs_teacher.win_rate"] == 0.5
    assert not any(k.startswith("vs_previous") for k in m0["win_rate"])
    # Round 1 against the saved answers of round 0 (which are also the teacher's), counted by hand.
    mine, theirs = a1["reward.words"], a0["reward.words"]
    wins = sum(a > b for a, b in zip(mine, theirs))
    ties = sum(a == b for a, b in zip(mine, theirs))
    for opponent in ("vs_previous", "vs_teacher"):
        assert m1["win_rate"][f"{opponent}.wins"] == wins and m1["win_rate"][f"{opponent}.ties"] == ties
        assert m1["win_rate"][f"{opponent}.win_rate"] == pytest.approx((wins + ties / 2) / 12)
        assert m1["win_rate"][f"{opponent}.ci_low"] <= m1["win_rate"][f"{opponent}.win_rate"]

    for suite in ("math", "ifeval"):
        assert m1[suite]["n"] + m1[suite]["unscored"] == 3
        assert (root / "round_1" / "07_eval" / suite / "answers.jsonl").is_file()


def test_report_of_the_tiny_run_matches_its_metrics(tiny_run, report_matches):
    root, _, _ = tiny_run
    md = build_report(root).read_text()
    report_matches(md, {0: _metrics(root, 0), 1: _metrics(root, 1)})
    data = json.loads((root / "plots" / "data.json").read_text())
    assert data["reward_distributions.png"]["words"]["mean"]["x"] == [0.0, 1.0]
    assert data["length_drift.png"]["answer length (tokens)"]["held-out answers (mean)"]["x"] == [0.0, 1.0]
