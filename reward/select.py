"""The select stage: best-of-K for SFT and chosen/rejected pairs for DPO (Llama 3, section 4.2.2; RLHFlow).

Per prompt, among its scored samples:
- SFT: the best (optionally only if its score reaches `min_score`);
- DPO: the best against the worst (`best_vs_worst`) or against a random lower-scored sample
  (`best_vs_random_lower`, seeded per prompt), kept when the margin is above `min_margin`.
Ties are broken the same way every time: a higher score wins, then the shorter response (so ties never feed
length drift), then the lower sample index. Prompts whose responses are all identical or all tied give no pair;
pairs whose two responses are near-identical are dropped. Every drop is counted by reason.

One streaming pass: the rows of a prompt are consecutive (the generate stage writes them so, and score and
filter keep the order), so only one prompt's samples are in memory at a time, read without the wide columns.
"""

from __future__ import annotations

import difflib
import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa

from posttrain.config import Pairing, SelectJob
from posttrain.errors import PosttrainError
from posttrain.rundir import Inputs, StageResult
from posttrain.shards import iter_columns, write_batches


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def similarity(a: str, b: str) -> float:
    """Character-level similarity of two normalised texts in [0, 1] (difflib's ratio)."""
    a, b = normalize_text(a), normalize_text(b)
    return 1.0 if a == b else difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _rank_key(row: dict):
    return (-row["score"], len(row["text"]), row["sample_idx"])


def best_of_k(samples: list[dict]) -> dict:
    """The best scored sample (deterministic tie-breaking, see module docstring)."""
    return min(samples, key=_rank_key)


def pair_for_prompt(samples: list[dict], pairing: Pairing | str, min_margin: float, max_similarity: float, seed: int):
    """(chosen, rejected) for one prompt's scored samples, or (None, reason) when it gives no pair."""
    pair, reason = candidate_pair(samples, pairing, min_margin, seed)
    if pair is not None and near_duplicate(pair[0]["text"], pair[1]["text"], max_similarity):
        return None, "near_duplicate"
    return pair, reason


def near_duplicate(chosen: str, rejected: str, max_similarity: float) -> bool:
    """Whether a pair's two responses are more similar than `max_similarity` (never, at 1.0 or more)."""
    return max_similarity < 1.0 and similarity(chosen, rejected) > max_similarity


def _near_duplicates(pairs: list[tuple[str, str]], max_similarity: float) -> list[bool]:
    """`near_duplicate` of every pair, in a pool of processes over this machine's cores when there are many: difflib
    on two 2 KB answers takes ~0.1 s of one core, so 50,000 pairs would take hours in one."""
    from posttrain.train.launch import threads_per_process

    workers = min(threads_per_process(), len(pairs) // 256)
    if max_similarity >= 1.0 or workers < 2:
        return [near_duplicate(a, b, max_similarity) for a, b in pairs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from itertools import repeat

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(near_duplicate, (a for a, _ in pairs), (b for _, b in pairs), repeat(max_similarity),
                             chunksize=64))


def candidate_pair(samples: list[dict], pairing: Pairing | str, min_margin: float, seed: int):
    """`pair_for_prompt` before the near-duplicate check."""
    if len(samples) < 2:
        return None, "fewer_than_two_scored"
    if len({normalize_text(s["text"]) for s in samples}) == 1:
        return None, "all_identical"
    if len({s["score"] for s in samples}) == 1:
        return None, "all_tied"
    ranked = sorted(samples, key=_rank_key)
    chosen = ranked[0]
    if pairing == Pairing.best_vs_worst:
        rejected = ranked[-1]
    else:
        lower = [s for s in ranked if s["score"] < chosen["score"]]
        rejected = random.Random(f"{seed}:{chosen['prompt_id']}").choice(lower)
    margin = chosen["score"] - rejected["score"]
    if margin <= min_margin:
        return None, "below_margin"
    return (chosen, rejected), None


def _taken(folder: str, wanted: list[int]) -> Iterator[pa.Table]:
    """Rows `wanted` (sorted) of a dataset folder, in one streaming pass, a batch's worth at a time."""
    start = w = 0
    for table in iter_columns(folder, None, 4096):
        if w == len(wanted):
            return
        end, take = start + len(table), []
        while w < len(wanted) and wanted[w] < end:
            take.append(wanted[w] - start)
            w += 1
        if take:
            yield table.take(take)
        start = end


def _prompt_groups(folder: str, columns: list[str]) -> Iterator[tuple[str, list[dict]]]:
    """(prompt id, its rows with `_index`, their row number) for each run of consecutive rows of one prompt, read
    in batches without the wide columns (the teacher's log-probs). A prompt whose rows are not consecutive is an
    error naming it: selection would see only part of its samples."""
    light = [c for c in ("prompt_id", "messages", "meta", "text", "score", "sample_idx", "round") if c in columns]
    seen: set[str] = set()
    pid, group, index = None, [], 0
    for table in iter_columns(folder, light, 4096):
        for row in table.to_pylist():
            if row["prompt_id"] != pid:
                if group:
                    yield pid, group
                pid, group = row["prompt_id"], []
                if pid in seen:
                    raise PosttrainError(f"select: {folder}: the rows of prompt {pid!r} are not consecutive (row "
                                         f"{index}); the stage reads each prompt's samples as one run, as the "
                                         f"generate stage writes them")
                seen.add(pid)
            group.append({**row, "_index": index})
            index += 1
    if group:
        yield pid, group


def _save(rows: list[dict], features: datasets.Features, path: Path) -> None:
    # An empty selection is a valid (and counted) outcome; from_list cannot type an empty list, and an empty
    # dataset saved in 0 shards would not reload.
    if not rows:
        datasets.Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(str(path), num_shards=1)
    else:
        datasets.Dataset.from_list(rows, features=features).save_to_disk(str(path))


def select(job: SelectJob, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `job`: the recipe's `select` section plus `seed`; `inputs`: `scored` (from the score
    stage, or the filter stage's `kept`). Writes `sft/` (best-of-K rows in the generations format, with `score`)
    and `pairs/` (prompt_id, messages, chosen, rejected, their scores, sample indices and margin)."""
    started = time.perf_counter()
    cfg = job.select
    scored = datasets.load_from_disk(inputs["scored"])
    drops: Counter = Counter()
    sft_rows, pair_rows = [], []  # sft_rows: (prompt id, the chosen row's index in `scored`)
    prompts = unscored = without_scores = 0
    for pid, group in _prompt_groups(inputs["scored"], scored.column_names):
        prompts += 1
        samples = [row for row in group if row["score"] is not None]
        unscored += len(group) - len(samples)
        if not samples:
            without_scores += 1
            continue
        best = best_of_k(samples)
        if cfg.min_score is not None and best["score"] < cfg.min_score:
            drops["sft_below_min_score"] += 1
        else:
            sft_rows.append((pid, best["_index"]))
        pair, reason = candidate_pair(samples, cfg.pairs, cfg.min_margin, job.seed)
        if pair is None:
            drops[f"pair_{reason}"] += 1
            continue
        chosen, rejected = pair
        pair_rows.append(
            {
                "prompt_id": pid,
                "messages": chosen["messages"],
                "meta": chosen["meta"],
                "chosen": chosen["text"],
                "rejected": rejected["text"],
                "chosen_score": chosen["score"],
                "rejected_score": rejected["score"],
                "margin": chosen["score"] - rejected["score"],
                "chosen_sample_idx": chosen["sample_idx"],
                "rejected_sample_idx": rejected["sample_idx"],
                "round": chosen["round"],
            }
        )
    # near-identical pairs out, in a pool of processes (the costly part of the stage at scale)
    near = _near_duplicates([(p["chosen"], p["rejected"]) for p in pair_rows], cfg.max_similarity)
    drops["pair_near_duplicate"] += sum(near)
    if not drops["pair_near_duplicate"]:
        del drops["pair_near_duplicate"]
    pair_rows = [p for p, dropped in zip(pair_rows, near) if not dropped]
    # in prompt id order, as always
    sft_rows = [index for _, index in sorted(sft_rows)]
    pair_rows.sort(key=lambda row: row["prompt_id"])
    # the best rows whole, every column of `scored` (the teacher's log-probs too), copied in Arrow
    # (to a file in row order, streaming, then put in prompt id order by datasets in batches)
    wanted = sorted(sft_rows)
    write_batches(out / "chosen.arrow", _taken(inputs["scored"], wanted), scored.features)
    position = {index: k for k, index in enumerate(wanted)}
    chosen = datasets.Dataset.from_file(str(out / "chosen.arrow"))
    chosen.select([position[i] for i in sft_rows]).save_to_disk(str(out / "sft"),
                                                                **({"num_shards": 1} if not sft_rows else {}))
    del chosen
    (out / "chosen.arrow").unlink()
    pair_features = datasets.Features(
        {
            "prompt_id": datasets.Value("string"),
            "messages": scored.features["messages"],
            "meta": datasets.Value("string"),
            "chosen": datasets.Value("string"),
            "rejected": datasets.Value("string"),
            "chosen_score": datasets.Value("float64"),
            "rejected_score": datasets.Value("float64"),
            "margin": datasets.Value("float64"),
            "chosen_sample_idx": datasets.Value("int32"),
            "rejected_sample_idx": datasets.Value("int32"),
            "round": datasets.Value("int32"),
        }
    )
    _save(pair_rows, pair_features, out / "pairs")
    return StageResult(
        outputs={"sft": "sft", "pairs": "pairs"},
        rows={"sft": len(sft_rows), "pairs": len(pair_rows)},
        metrics={
            "rows": len(scored),
            "unscored_rows": unscored,
            "prompts": prompts,
            "prompts_without_scores": without_scores,
            "sft_rows": len(sft_rows),
            "pairs": len(pair_rows),
            "dropped": dict(sorted(drops.items())),
            "mean_margin": sum(p["margin"] for p in pair_rows) / len(pair_rows) if pair_rows else None,
            "throughput": {"rows": len(scored), "seconds": round(time.perf_counter() - started, 3),
                           "rows_per_s": round(len(scored) / max(time.perf_counter() - started, 1e-9), 2)},
        },
    )
