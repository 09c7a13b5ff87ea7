"""The score stage: every configured reward on every generation, saved beside the generations.

The generations are scored in shards of `launch.data.score_shard_rows` rows (rounded up to a multiple of
`reward.batch_size`, so the batches a reward sees do not depend on the shard size), each read from Arrow, scored
and written as soon as it is done (posttrain/shards.py): a crash or a killed rank costs only unfinished shards,
and `launch.data.nproc.score` processes per node (e.g. one reward-model replica per GPU) share them, with the
same output as one process. No stage step holds all rows in memory.

A reward that raises on a batch is retried row by row, so one bad row costs one score and not the batch; rows
it still fails on, and NaN or infinite scores, become None, are written to `quarantine.jsonl` with the reason,
and are counted per reward in the manifest. A reward that returns the wrong number of scores is a bug in that
reward and stops the stage with its name.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from posttrain.config import DataLaunch, RewardConfig
from posttrain.errors import PosttrainError
from posttrain.rundir import Inputs, StageResult, write_text_atomic
from posttrain.shards import Shards, arrow_files, count_rows, iter_columns, publish, read_rows, run_ranks, shard_plan
from reward.protocol import build_reward, with_trained_model


def reward_prompt(row: dict) -> dict:
    """The prompt dict a reward sees for a generation row: prompt_id, messages and the prompt's extra fields."""
    return {**json.loads(row.get("meta") or "{}"), "prompt_id": row["prompt_id"], "messages": row["messages"]}


def _call(name: str, fn, prompts: list[dict], responses: list[str]) -> list:
    out = fn(prompts, responses)
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__len__"):
        raise PosttrainError(f"reward {name!r} returned {type(out).__name__} {str(out)[:80]!r}, not a list with one "
                             f"score per response (the Reward protocol: batch in, batch out; reward/protocol.py)")
    out = list(out)
    if len(out) != len(responses):
        raise PosttrainError(f"reward {name!r} returned {len(out)} scores for {len(responses)} responses")
    return out


def score_rows(name: str, fn, prompts: list[dict], responses: list[str], batch_size: int,
               progress: bool = True) -> tuple[list, list]:
    """Run one reward over all rows in batches. Returns (scores with None for failures, quarantine records)."""
    scores: list[float | None] = []
    quarantine: list[dict] = []
    for start in tqdm(range(0, len(responses), batch_size), desc=f"score {name}", unit="batch",
                      disable=not progress):
        p, r = prompts[start : start + batch_size], responses[start : start + batch_size]
        try:
            batch = _call(name, fn, p, r)
        except PosttrainError:
            raise
        except Exception:  # noqa: BLE001 - isolate the failing rows below
            batch, errors = [], []
            for i in range(len(r)):
                try:
                    batch.extend(_call(name, fn, p[i : i + 1], r[i : i + 1]))
                except PosttrainError:
                    raise
                except Exception as e:  # noqa: BLE001 - the row is quarantined with the error
                    batch.append(None)
                    errors.append(f"{type(e).__name__}: {e}")
                    quarantine.append({"reward": name, "row": start + i, "reason": errors[-1]})
            if len(r) > 1 and len(errors) == len(r) and len(set(errors)) == 1:
                # Not an odd row: the reward is broken (or misconfigured) for every input. Stop, do not quarantine.
                raise PosttrainError(f"reward {name!r} fails on every row of a batch of {len(r)} with the same "
                                     f"error: {errors[0]}") from None
        for i, s in enumerate(batch):
            if s is not None and not (isinstance(s, (int, float)) and math.isfinite(float(s))):
                quarantine.append({"reward": name, "row": start + i, "reason": f"not a finite number: {s!r}"})
                batch[i] = None
        scores.extend(None if s is None else float(s) for s in batch)
    reasons = {q["reason"] for q in quarantine}
    if len(responses) > 1 and len(quarantine) == len(responses) and len(reasons) == 1:  # batches of one row too
        raise PosttrainError(f"reward {name!r} fails on every row with the same error: {reasons.pop()}")
    return scores, quarantine


def summarize(scores: list, lengths: list[int], quarantine: list[dict]) -> dict:
    """mean, std, percentiles, None count and correlation with response length of one reward's scores."""
    pairs = [(s, n) for s, n in zip(scores, lengths) if s is not None]
    out = {"count": len(pairs), "none": len(scores) - len(pairs), "quarantined": len(quarantine)}
    if pairs:
        vals = np.array([s for s, _ in pairs])
        lens = np.array([n for _, n in pairs], dtype=float)
        out.update(
            mean=float(vals.mean()),
            std=float(vals.std()),
            **{f"p{q}": float(np.percentile(vals, q)) for q in (10, 50, 90)},
            corr_length=float(np.corrcoef(vals, lens)[0, 1]) if vals.std() > 0 and lens.std() > 0 else None,
        )
    return out


LIGHT = ("prompt_id", "messages", "meta", "text", "sample_idx", "completion_tokens")  # what a reward reads


def _features(generations: str, rewards: list[str]) -> datasets.Features:
    features = datasets.load_from_disk(generations).features.copy()  # its metadata: no row is read
    features.update({f"reward.{name}": datasets.Value("float64") for name in rewards})
    features["score"] = datasets.Value("float64")
    return features


def score_shards(settings: dict, rank: int, world: int) -> None:
    """One rank's part of the stage (posttrain.shards.run_ranks): build the rewards once if any of its shards is
    left, then score each shard and write it with its quarantine records (row numbers of the whole dataset)."""
    out, size, n = Path(settings["out"]), settings["shard_rows"], settings["rows"]
    shards = Shards(out, -(-n // size), rank, world, desc=settings["desc"], attempt=settings["attempt"])
    todo = shards.todo()
    if not todo:
        return
    files = arrow_files(settings["generations"])
    features = _features(settings["generations"], list(settings["rewards"]))
    fns = {name: build_reward(with_trained_model(name, node, settings["inputs"]))
           for name, node in settings["rewards"].items()}
    for i in todo:
        started = time.perf_counter()
        table = read_rows(files, i * size, min(n, (i + 1) * size))
        rows = table.select(list(LIGHT)).to_pylist()
        prompts, responses = [reward_prompt(r) for r in rows], [r["text"] for r in rows]
        quarantine = []
        for name, fn in fns.items():
            scores, q = score_rows(name, fn, prompts, responses, settings["batch_size"], progress=False)
            table = table.append_column(f"reward.{name}", pa.array(scores, pa.float64()))
            quarantine += [{**r, "row": i * size + r["row"], "prompt_id": rows[r["row"]]["prompt_id"],
                            "sample_idx": rows[r["row"]]["sample_idx"]} for r in q]
        table = table.append_column("score", table.column(f"reward.{settings['primary']}"))
        write_text_atomic(shards.path(i).with_suffix(".quarantine"),
                          "".join(json.dumps(q) + "\n" for q in quarantine))
        shards.finish(i, table, features, tokens=sum(r["completion_tokens"] or 0 for r in rows),
                      seconds=time.perf_counter() - started)


def score(cfg: RewardConfig, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `cfg`: the recipe's `reward` section (`rewards`: name -> `_target_` config, `primary`,
    `batch_size`), with `launch` (a ScoreJob: processes and shard size); `inputs`: `generations`, and `rm` (a
    folder) when this round trained a reward model: it is the `model` of the reward named `rm`. Writes `scored/`:
    the generations plus one `reward.<name>` column per reward and `score` (the primary reward, which selection
    ranks by)."""
    launch = asdict(cfg.launch) if hasattr(cfg, "launch") else {}
    data = launch.get("data") or asdict(DataLaunch())
    # A primary that is not there this round (the RM, before any preference data exists) falls back to the first.
    primary = cfg.primary if cfg.primary in cfg.rewards else next(iter(cfg.rewards))
    n = count_rows(inputs["generations"])
    size = shard_plan(out, {"shard_rows": -(-max(int(data["score_shard_rows"]), 1) // cfg.batch_size)
                            * cfg.batch_size})["shard_rows"]
    settings = {"generations": inputs["generations"], "out": str(out), "rows": n, "shard_rows": size,
                "rewards": dict(cfg.rewards), "batch_size": cfg.batch_size, "primary": primary,
                "inputs": dict(inputs), "desc": "score"}
    started = time.perf_counter()
    attempt = run_ranks("reward.score:score_shards", settings, out, launch, "score")
    shards = Shards(out, -(-n // size), desc="score", attempt=attempt)
    throughput = shards.throughput(time.perf_counter() - started)
    quarantine = [json.loads(line) for i in range(shards.n)
                  for line in open(shards.path(i).with_suffix(".quarantine"))]
    held = sum(d["rows"] for d in shards.sidecars())
    if held != n:  # shards cut another way than this plan: never publish a partial dataset
        raise PosttrainError(f"score: the shards in {shards.dir} hold {held} rows, the generations {n}; delete "
                             f"{shards.dir} to score again")
    publish(shards.files(), out / "scored", _features(inputs["generations"], list(cfg.rewards)))
    columns = {name: [] for name in cfg.rewards}
    lengths: list[int] = []
    for table in iter_columns(out / "scored", ["completion_tokens", *(f"reward.{r}" for r in cfg.rewards)], 8192):
        lengths += table.column("completion_tokens").to_pylist()
        for name in cfg.rewards:
            columns[name] += table.column(f"reward.{name}").to_pylist()
    summary = {name: summarize(columns[name], lengths, [q for q in quarantine if q["reward"] == name])
               for name in cfg.rewards}
    if quarantine:
        write_text_atomic(out / "quarantine.jsonl", "".join(json.dumps(q) + "\n" for q in quarantine))
    shutil.rmtree(shards.dir)  # last: a crash before this point leaves every shard for the rerun
    return StageResult(
        outputs={"scored": "scored"},
        rows=n,
        metrics={"primary": primary, "rewards": summary, "quarantined": len(quarantine), "throughput": throughput},
    )
