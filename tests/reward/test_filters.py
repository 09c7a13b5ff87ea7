"""The filter stage and its rule, quality, difficulty and topic filters on hand-made rows."""

import json

import datasets
import pytest

from posttrain.config import FilterConfig
from posttrain.errors import PosttrainError
from reward.filters import FilterContext, FilterResult, RuleFilter, filter_stage
from reward.quality import Difficulty, Quality, Topics, rank01

PROMPTS = {
    "code": "Write a Python function that reverses a string.",
    "math": "Solve the equation 3x + 5 = 20 and show the steps.",
    "poem": "Write a short poem about autumn leaves.",
    "chat": "What is your favourite colour?",
}


def row(pid, idx, text, score, finish="stop", **extra):
    return {"prompt_id": pid, "messages": [{"role": "user", "content": PROMPTS.get(pid, pid)}], "meta": "{}",
            "sample_idx": idx, "text": text, "prompt_tokens": 10, "completion_tokens": len(text.split()),
            "finish_reason": finish, "model": "m", "round": 1, "reward.rm": score, "score": score, **extra}


def dataset(rows):
    return datasets.Dataset.from_list(rows)


CTX = FilterContext()
FINE = "Use slicing: s[::-1] returns the reversed string. It works for any sequence type."


@pytest.mark.parametrize(
    "text, finish, reason",
    [
        (FINE, "stop", None),
        ("", "stop", "empty"),
        (" \n\t ", "stop", "empty"),
        (FINE, "length", "truncated"),
        ("Great!!! Amazing!!! " + FINE, "stop", "exclamation"),
        ("Here you go 😀😀😀🎉🎉🔥 " + FINE, "stop", "emoji"),
        ("I'm sorry, I apologize for the confusion. " + FINE, "stop", "apology"),
        ("As an AI, I do not have preferences. " + FINE, "stop", "ai_disclaimer"),
        ("\n".join(["The answer is forty-two."] * 5), "stop", "repeated_line"),
        ("I think that " + "the cat sat on the mat and " * 10, "stop", "repeated_ngram"),
    ],
)
def test_rule_filter_reasons(text, finish, reason):
    got = RuleFilter().reason(text, finish)
    assert (got.split(":")[0] if got else None) == reason


def test_rule_filter_leaves_code_ordinary_refusals_and_one_apology_alone():
    f = RuleFilter()
    code = "Compare with:\n```python\nif a != b:\n    print('no!!!!!!!!')\n```\nDone."
    assert f.reason(code, "stop") is None  # "!" inside code does not count
    assert f.reason("I'm sorry to hear that. Try restarting the router first.", "stop") is None
    assert f.reason("I can't help with making weapons.", "stop") is None  # safety data needs refusals
    assert RuleFilter(drop_truncated=False, max_exclamations=None).reason("Wow!!!!!!!!", "length") is None


def test_rule_filter_on_rows_reads_finish_reason():
    rows = dataset([row("a", 0, FINE, 1.0), row("a", 1, FINE, 1.0, finish="length"), row("b", 0, "", 0.0)])
    assert RuleFilter()(rows, CTX).reasons == [None, "truncated: finish_reason=length", "empty"]


def test_rank01():
    assert rank01([None]) == [None] and rank01([5.0]) == [0.0]


def test_quality_is_top_quantile_of_the_reward_or_the_judges_top_rating():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    judge = [0.0, 1.0, 0.5, None, 0.0, 0.0, 0.0, 0.2]  # row 1: low reward but the judge's top rating
    rows = dataset([row(f"p{i}", 0, FINE, s, **{"reward.judge": j}) for i, (s, j) in enumerate(zip(scores, judge))])
    res = Quality(judge="reward.judge")(rows, CTX)
    assert res.columns["quality_high"] == [False, True, False, False, False, False, True, True]
    assert res.reasons == [None] * 8  # annotates only, by default
    assert res.columns["quality"][1] == 1.0 and res.columns["quality"][0] == 0.0
    assert res.metrics["high_by_reward"] == 2 and res.metrics["high_by_judge"] == 1
    # a judge called here (any Reward) works the same; drop_low removes the rest
    calls = []

    def judge_fn(prompts, responses):
        calls.append(len(prompts))
        return judge

    res = Quality(judge=judge_fn, drop_low=True)(rows, CTX)
    assert calls == [8]
    assert [r is None for r in res.reasons] == res.columns["quality_high"]
    assert res.reasons[0] == "low_quality"


def test_difficulty_proxy_is_the_spread_of_rewards_across_a_prompts_samples():
    rows = dataset(
        [row("easy", i, FINE, s) for i, s in enumerate([0.9, 0.9, 0.9])]  # always right: no spread
        + [row("mixed", i, FINE, s) for i, s in enumerate([0.0, 1.0, 0.5])]  # sometimes right: hardest useful
        + [row("hard", i, FINE, s) for i, s in enumerate([0.0, 0.1, 0.0])]
        + [row("single", 0, FINE, 0.5), row("single", 1, FINE, None)]  # one scored sample: unrated
    )
    d = Difficulty()(rows, CTX)
    by_prompt = dict(zip(rows["prompt_id"], d.columns["difficulty"]))
    assert by_prompt == {"easy": 0.0, "hard": 0.5, "mixed": 1.0, "single": None}
    assert d.reasons == [None] * len(rows) and d.metrics["unrated_prompts"] == 1
    low = dict(zip(rows["prompt_id"], Difficulty(proxy="low_mean")(rows, CTX).columns["difficulty"]))
    assert low["hard"] == 1.0 and low["easy"] == 0.0


def test_difficulty_from_a_judge_rates_each_prompts_best_sample_once():
    rows = dataset([row("a", 0, "worse", 0.1), row("a", 1, "best", 0.9), row("b", 0, "only", 0.5)])
    seen = []

    def judge(prompts, responses):
        seen.extend(responses)
        return [0.8, 0.2]

    assert Difficulty(judge=judge)(rows, CTX).columns["difficulty"] == [0.8, 0.8, 0.2]
    assert seen == ["best", "only"]


class CannedBackend:
    def __init__(self, replies):
        self.replies = list(replies)

    def generate(self, prompts, n, sampling):
        assert sampling.temperature == 0 and n == 1
        return [[{"text": self.replies.pop(0)}] for _ in prompts]


def test_topics_by_keyword_and_by_judge():
    rows = dataset([row("code", 0, FINE, 1.0), row("code", 1, FINE, 0.0), row("math", 0, FINE, 1.0),
                    row("poem", 0, FINE, 1.0), row("chat", 0, FINE, 1.0)])
    res = Topics()(rows, CTX)
    assert res.columns["topic"] == ["code", "code", "math", "writing", "general"]
    assert res.metrics["prompts_per_topic"] == {"code": 1, "math": 1, "writing": 1, "general": 1}
    judged = Topics(backend=CannedBackend(["Code", "math.", "Writing", "no idea"]))(rows, CTX)
    assert judged.columns["topic"] == ["code", "code", "math", "writing", "general"]


def wrong_length_filter(rows, context):
    return FilterResult([None])


def test_filter_stage_end_to_end(tmp_path):
    rows = [
        row("code", 0, FINE, 0.9), row("code", 1, "", 0.0), row("code", 2, FINE + " Also s[::-1].", 0.5),
        row("math", 0, "Subtract 5 from both sides to get 3x = 15, so x = 5 is the solution.", 1.0),
        row("math", 1, "x = 5!!!!!!! Easy!!!", 0.2, finish="length"),  # truncated wins: first rule broken
        row("poem", 0, FINE, 0.3),  # the same answer as code#0 to another prompt
        row("chat", 0, "Blue, because it reminds people of the sea and the open sky above it.", 0.4),
    ]
    dataset(rows).save_to_disk(str(tmp_path / "scored"))
    prev = dataset([row("old", 0, "Blue, because it reminds people of the sea and the open sky above it.", 1.0)])
    prev.save_to_disk(str(tmp_path / "prev_sft"))
    cfg = FilterConfig(filters={
        "quality": {"_target_": "reward.quality.Quality"},
        "rules": {"_target_": "reward.filters.RuleFilter"},
        "difficulty": {"_target_": "reward.quality.Difficulty"},
        "topics": {"_target_": "reward.quality.Topics"},
        "dedup": {"_target_": "reward.dedup.TextDedup"},
    })
    out = tmp_path / "out"
    out.mkdir()
    inputs = {"scored": str(tmp_path / "scored"), "previous_sft": [str(tmp_path / "prev_sft")]}
    result = filter_stage(cfg, inputs, out)
    kept, removed = datasets.load_from_disk(str(out / "kept")), datasets.load_from_disk(str(out / "removed"))
    assert [(r["prompt_id"], r["sample_idx"]) for r in kept] == [("code", 0), ("code", 2), ("math", 0)]
    got = {(r["prompt_id"], r["sample_idx"]): (r["filter"], r["reason"].split(":")[0]) for r in removed}
    assert got == {
        ("code", 1): ("rules", "empty"),
        ("math", 1): ("rules", "truncated"),
        ("poem", 0): ("dedup", "exact_duplicate"),
        ("chat", 0): ("dedup", "exact_duplicate_previous"),
    }
    assert {"quality", "quality_high", "difficulty", "topic", "reward.rm", "score"} <= set(kept.column_names)
    assert removed[0]["difficulty"] is None and removed[0]["quality"] is not None  # removed before/after each
    m = result.metrics
    assert (m["rows_in"], m["rows_out"], m["previous_texts"]) == (7, 3, 1)
    assert m["filters"]["rules"] == {"rows_in": 7, "removed": 2, "reasons": {"empty": 1, "truncated": 1}}
    assert m["filters"]["dedup"]["reasons"] == {"exact_duplicate": 1, "exact_duplicate_previous": 1}
    assert m["filters"]["quality"]["removed"] == 0
    assert m["topics"] == {"code": 2, "math": 1}
    assert result.rows == {"kept": 3, "removed": 4} and result.outputs == {"kept": "kept", "removed": "removed"}
    json.dumps(m)  # the manifest can hold it

    (tmp_path / "empty").mkdir()
    bad = FilterConfig(filters={"bad": {"_target_": "tests.reward.test_filters.wrong_length_filter"}})
    with pytest.raises(PosttrainError, match="bad"):
        filter_stage(bad, {"scored": str(tmp_path / "scored")}, tmp_path / "empty")


def test_filter_stage_without_filters_keeps_everything(tmp_path):
    dataset([row("a", 0, FINE, 1.0)]).save_to_disk(str(tmp_path / "scored"))
    result = filter_stage(FilterConfig(), {"scored": str(tmp_path / "scored"), "previous_sft": []}, tmp_path)
    assert result.rows == {"kept": 1, "removed": 0}
    removed = datasets.load_from_disk(str(tmp_path / "removed"))
    assert len(removed) == 0 and {"filter", "reason"} <= set(removed.column_names)


CALLS: list[str] = []


def counting_filter(rows, context, name="count", crash=None):
    """Removes nothing; logs that it ran; raises when `crash` is a file that exists (a crash mid-stage)."""
    CALLS.append(name)
    if crash is not None and __import__("os").path.exists(crash):
        raise RuntimeError("killed")
    return FilterResult([None] * len(rows), {f"seen_{name}": [1] * len(rows)})


def test_a_filter_stage_cut_short_resumes_from_the_next_filter_and_ends_identical(tmp_path):
    rows = [row("code", 0, FINE, 0.9), row("code", 1, "", 0.0), row("poem", 0, FINE, 0.3),
            row("math", 0, "Subtract 5 from both sides to get 3x = 15, so x = 5 is the solution.", 1.0)]
    dataset(rows).save_to_disk(str(tmp_path / "scored"))
    crash = tmp_path / "crash"
    crash.touch()
    cfg = FilterConfig(filters={
        "rules": {"_target_": "reward.filters.RuleFilter"},
        "first": {"_target_": "tests.reward.test_filters.counting_filter", "name": "first"},
        "second": {"_target_": "tests.reward.test_filters.counting_filter", "name": "second", "crash": str(crash)},
        "dedup": {"_target_": "reward.dedup.TextDedup"},
    })
    out, ref = tmp_path / "out", tmp_path / "ref"
    out.mkdir()
    ref.mkdir()
    CALLS.clear()
    with pytest.raises(RuntimeError, match="killed"):
        filter_stage(cfg, {"scored": str(tmp_path / "scored")}, out)
    assert CALLS == ["first", "second"] and len(list((out / "checkpoints").iterdir())) == 2
    crash.unlink()
    CALLS.clear()
    resumed = filter_stage(cfg, {"scored": str(tmp_path / "scored")}, out)
    assert CALLS == ["second"]  # the rules and the first filter were not run again
    CALLS.clear()
    whole = filter_stage(cfg, {"scored": str(tmp_path / "scored")}, ref)
    assert resumed.metrics.pop("throughput")["rows"] == whole.metrics.pop("throughput")["rows"] == 4
    assert resumed.metrics == whole.metrics and resumed.rows == {"kept": 2, "removed": 2}
    for name in ("kept", "removed"):
        assert datasets.load_from_disk(str(out / name)).to_list() == datasets.load_from_disk(str(ref / name)).to_list()
    kept = datasets.load_from_disk(str(out / "kept"))
    assert kept["seen_first"] == [1, 1] and kept["seen_second"] == [1, 1]
    assert not (out / "checkpoints").exists() and not (out / "scratch").exists()
