"""Best-of-K and pair selection: ties, identical responses, margins, near-duplicates, None scores."""

import dataclasses

import datasets
import pytest

from posttrain.config import Pairing, SelectConfig, SelectJob
from reward.select import best_of_k, pair_for_prompt, select, similarity

CFG = SelectJob(select=SelectConfig(min_score=None, pairs=Pairing.best_vs_worst, min_margin=0.0, max_similarity=0.95),
                seed=0)


def sample(i, text, score, pid="p"):
    return {"prompt_id": pid, "sample_idx": i, "text": text, "score": score}


def test_best_of_k_breaks_ties_by_shorter_then_lower_index():
    samples = [sample(0, "a long answer", 1.0), sample(1, "short", 1.0), sample(2, "tiny!", 1.0), sample(3, "x", 0.5)]
    assert best_of_k(samples)["sample_idx"] == 1  # "short" and "tiny!" tie on length too: lower index wins
    assert best_of_k(list(reversed(samples)))["sample_idx"] == 1  # order of the input does not matter


def test_best_vs_worst_pair_and_margin():
    samples = [sample(0, "good answer", 0.9), sample(1, "bad", 0.1), sample(2, "meh answer", 0.5)]
    (chosen, rejected), reason = pair_for_prompt(samples, "best_vs_worst", 0.0, 0.95, seed=0)
    assert (chosen["sample_idx"], rejected["sample_idx"], reason) == (0, 1, None)
    assert pair_for_prompt(samples, "best_vs_worst", 0.8, 0.95, seed=0) == (None, "below_margin")


def test_best_vs_random_lower_is_seeded_and_always_lower():
    samples = [sample(i, f"answer number {i} " * (i + 1), s) for i, s in enumerate([0.9, 0.2, 0.5, 0.1, 0.9])]
    picks = {pair_for_prompt(samples, "best_vs_random_lower", 0.0, 0.95, seed=s)[0][1]["sample_idx"] for s in range(20)}
    assert picks <= {1, 2, 3} and len(picks) > 1  # never the tied best (4), varies with the seed
    a = pair_for_prompt(samples, "best_vs_random_lower", 0.0, 0.95, seed=3)
    assert a == pair_for_prompt(samples, "best_vs_random_lower", 0.0, 0.95, seed=3)


@pytest.mark.parametrize(
    "samples, reason",
    [
        ([sample(0, "same", 1.0), sample(1, " SAME ", 0.0)], "all_identical"),
        ([sample(0, "one", 0.5), sample(1, "two", 0.5)], "all_tied"),
        ([sample(0, "only", 0.5)], "fewer_than_two_scored"),
        ([sample(0, "The cat sat on the mat today.", 1.0), sample(1, "The cat sat on the mat today!", 0.0)],
         "near_duplicate"),
    ],
)
def test_prompts_that_give_no_pair(samples, reason):
    assert pair_for_prompt(samples, "best_vs_worst", 0.0, 0.95, seed=0) == (None, reason)


def test_similarity():
    assert similarity("Hello  World", "hello world") == 1.0
    assert similarity("abc", "xyz") == 0.0


def _scored(tmp_path, rows):
    features = datasets.Features({
        "prompt_id": datasets.Value("string"),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "meta": datasets.Value("string"),
        "sample_idx": datasets.Value("int32"),
        "text": datasets.Value("string"),
        "score": datasets.Value("float64"),
        "round": datasets.Value("int32"),
    })
    full = [{"messages": [{"role": "user", "content": r["prompt_id"]}], "meta": "{}", "round": 1, **r} for r in rows]
    path = tmp_path / "scored"
    datasets.Dataset.from_list(full, features=features).save_to_disk(str(path))
    return str(path)


def test_select_stage_writes_sft_and_pairs_and_counts_every_drop(tmp_path):
    rows = [
        # p1: a clean pair
        sample(0, "a fine answer", 0.9, "p1"), sample(1, "wrong", 0.1, "p1"),
        # p2: all identical
        sample(0, "same", 0.7, "p2"), sample(1, "same", 0.2, "p2"),
        # p3: all tied
        sample(0, "one", 0.4, "p3"), sample(1, "two", 0.4, "p3"),
        # p4: one scored, one not (None is kept out of selection and counted)
        sample(0, "scored", 0.3, "p4"), sample(1, "unscored", None, "p4"),
        # p5: nothing scored
        sample(0, "x", None, "p5"),
    ]
    out = tmp_path / "out"
    out.mkdir()
    job = SelectJob(select=dataclasses.replace(CFG.select, min_score=0.35))
    result = select(job, {"scored": _scored(tmp_path, rows)}, out)
    m = result.metrics
    assert m["unscored_rows"] == 2 and m["prompts"] == 5 and m["prompts_without_scores"] == 1
    assert m["dropped"] == {
        "pair_all_identical": 1,
        "pair_all_tied": 1,
        "pair_fewer_than_two_scored": 1,
        "sft_below_min_score": 1,  # p4's best is 0.3
    }
    sft = datasets.load_from_disk(str(out / "sft"))
    assert sorted(zip(sft["prompt_id"], sft["text"])) == [("p1", "a fine answer"), ("p2", "same"), ("p3", "one")]
    pairs = datasets.load_from_disk(str(out / "pairs"))
    assert pairs.to_list()[0] | {} == pairs[0]
    assert (pairs[0]["prompt_id"], pairs[0]["chosen"], pairs[0]["rejected"]) == ("p1", "a fine answer", "wrong")
    assert pairs[0]["margin"] == pytest.approx(0.8)
    assert result.rows == {"sft": 3, "pairs": 1}


def test_select_with_no_pairs_writes_empty_datasets(tmp_path):
    rows = [sample(0, "only one sample", 0.5, "p1")]
    out = tmp_path / "out"
    out.mkdir()
    result = select(CFG, {"scored": _scored(tmp_path, rows)}, out)
    assert result.rows == {"sft": 1, "pairs": 0}
    assert len(datasets.load_from_disk(str(out / "pairs"))) == 0
    assert "chosen" in datasets.load_from_disk(str(out / "pairs")).column_names
    # no best answer reaches min_score: an empty SFT set that reloads with every column of the scored rows
    again = tmp_path / "again"
    again.mkdir()
    job = SelectJob(select=dataclasses.replace(CFG.select, min_score=0.9))
    assert select(job, {"scored": _scored(tmp_path, rows)}, again).rows == {"sft": 0, "pairs": 0}
    empty = datasets.load_from_disk(str(again / "sft"))
    assert len(empty) == 0 and "text" in empty.column_names and "score" in empty.column_names


def test_a_prompt_whose_rows_are_not_consecutive_is_an_error_naming_it(tmp_path):
    rows = [{"prompt_id": pid, "messages": [{"role": "user", "content": "q"}], "meta": "{}", "sample_idx": i,
             "text": f"answer {pid} {i}", "score": float(i), "round": 1} for pid, i in (("a", 0), ("b", 0), ("a", 1))]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "scored"))
    (tmp_path / "out").mkdir()
    with pytest.raises(Exception, match=r"the rows of prompt 'a' are not consecutive \(row 2\)"):
        select(SelectJob(select=SelectConfig()), {"scored": str(tmp_path / "scored")}, tmp_path / "out")


def test_near_duplicate_checks_in_a_process_pool_equal_the_plain_loop():
    from reward.select import _near_duplicates, near_duplicate

    rng = __import__("random").Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sky", "blue", "sea", "tree"]
    pairs = []
    for i in range(600):
        a = " ".join(rng.choice(words) for _ in range(30))
        pairs.append((a, a + " end" if i % 3 == 0 else " ".join(rng.choice(words) for _ in range(30))))
    plain = [near_duplicate(a, b, 0.95) for a, b in pairs]
    assert _near_duplicates(pairs, 0.95) == plain and 150 < sum(plain) < 450
    assert not any(_near_duplicates(pairs, 1.0))  # the check off: nothing computed, nothing dropped
