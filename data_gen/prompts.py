"""Prompt pools: one or more sources (posttrain.sources: JSONL, JSON, parquet, `datasets` folders, hub ids, with a
`columns` mapping and a weight), validated row by row, sampled per round.

A row holds either `messages` (chat turns; a trailing assistant answer, as in an SFT set, is dropped) or `prompt`
(text, one user turn, or messages), and optionally `id` (otherwise a hash of the messages). Any other fields (a
reference `answer`, `constraints`, unit `tests`...) travel with the prompt as its `meta`, for rewards.
A malformed row is an error naming the file and line (JSONL) or row (dataset). An empty prompt is an error,
or, with `on_empty="quarantine"`, set aside and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from posttrain.sources import ROLES, Source, SourceError, parse_sources, prompt_id, prompt_of, rows

__all__ = ["ROLES", "PromptError", "PromptSet", "load_prompts", "load_pools", "sample_round", "sample_mix", "shares"]

PromptError = SourceError


@dataclass
class PromptSet:
    prompts: list[dict]  # {"prompt_id": str, "messages": [...], "meta": {other fields of the row}}
    quarantined: list[dict] = field(default_factory=list)  # {"where": "file:line", "reason": str, "row": ...}


def load_prompts(source: str | Source, on_empty: str = "error", split: str = "train") -> PromptSet:
    """Read and validate every row of one prompt source (a path or spec string, or a Source). Returns the valid
    prompts, in file order, and the quarantined rows. Raises PromptError naming the file and line/row for
    malformed input."""
    if on_empty not in ("error", "quarantine"):
        raise PromptError(f"data.on_empty must be 'error' or 'quarantine', not {on_empty!r}")
    if isinstance(source, str):
        source = Source(path=source, split=split)
    out = PromptSet(prompts=[])
    seen: dict[str, str] = {}
    for where, row in rows(source):
        msgs = prompt_of(where, row)
        if not any(m["content"].strip() for m in msgs if m["role"] != "system"):
            if on_empty == "error":
                raise PromptError(f"{where}: empty prompt (set data.on_empty=quarantine to set such rows aside)")
            out.quarantined.append({"where": where, "reason": "empty prompt", "row": row})
            continue
        pid = prompt_id(row, msgs)
        if pid in seen:
            raise PromptError(f"{where}: prompt id {pid!r} already used at {seen[pid]}")
        seen[pid] = where
        meta = {k: v for k, v in row.items() if k not in ("id", "prompt_id", "prompt", "messages")}
        out.prompts.append({"prompt_id": pid, "messages": msgs, "meta": meta})
    if not out.prompts:
        raise PromptError(f"{source}: no usable prompts")
    return out


def load_pools(value, on_empty: str = "error", split: str = "train",
               key: str = "data.prompts") -> list[tuple[Source, PromptSet]]:
    """Every source of a `data.prompts` value (a path, a mapping or a list of them) with its prompts. A prompt id
    used by two sources is an error: rounds could otherwise draw one prompt twice."""
    pools = [(s, load_prompts(s, on_empty)) for s in parse_sources(value, key, split)]
    if not pools:
        raise PromptError(f"{key}: no prompt source given")
    owner: dict[str, Source] = {}
    for s, pool in pools:
        for p in pool.prompts:
            if p["prompt_id"] in owner:
                raise PromptError(f"{s}: prompt id {p['prompt_id']!r} is also in {owner[p['prompt_id']]}")
            owner[p["prompt_id"]] = s
    return pools


def shares(weights: list[float], total: int) -> list[int]:
    """How many of the first `total` prompts of the stream each source gives: smooth weighted round-robin, so the
    counts for any prefix of the stream are as close to the weights as whole numbers allow and grow with it (round
    r takes the stretch between the counts at its start and its end)."""
    counts, current, whole = [0] * len(weights), [0.0] * len(weights), sum(weights)
    for _ in range(total):
        for i, w in enumerate(weights):
            current[i] += w
        j = max(range(len(weights)), key=current.__getitem__)
        current[j] -= whole
        counts[j] += 1
    return counts


def sample_mix(pools: list[PromptSet], weights: list[float], n: int, start: int, seed: int) -> list[dict]:
    """`n` prompts from position `start` of the mixed stream: each source keeps its own seeded stream
    (`sample_round`) and gives its weight's share of every round. One source: `sample_round` itself."""
    if len(pools) == 1:
        return sample_round(pools[0].prompts, n, start, seed)
    before, after = shares(weights, start), shares(weights, start + n)
    out: list[dict] = []
    for i, pool in enumerate(pools):
        out += sample_round(pool.prompts, after[i] - before[i], before[i], f"{seed}:{i}")
    return out


def sample_round(prompts: list[dict], n: int, start: int, seed: int | str) -> list[dict]:
    """`n` distinct prompts read from position `start` of a stream made of seeded permutations of the pool, one
    after another. Rounds read consecutive stretches (round r starts where round r-1 ended), so they get
    disjoint prompts until the pool runs out. A round takes at most the whole pool (more is an error) and never a
    prompt twice: where its stretch crosses into the next permutation, prompts it already has are skipped."""
    if n > len(prompts):
        raise PromptError(f"a round asks for {n} prompts from a pool of {len(prompts)}; lower data.num_prompts or "
                          f"add prompts")
    out: list[dict] = []
    taken: set[str] = set()
    pos = start
    orders: dict[int, list[int]] = {}  # one seeded permutation per pass over the pool
    while len(out) < n:
        epoch, offset = divmod(pos, len(prompts))
        if epoch not in orders:
            orders[epoch] = list(range(len(prompts)))
            random.Random(f"{seed}:{epoch}").shuffle(orders[epoch])
        p = prompts[orders[epoch][offset]]
        if p["prompt_id"] not in taken:
            taken.add(p["prompt_id"])
            out.append(p)
        pos += 1
    return out
