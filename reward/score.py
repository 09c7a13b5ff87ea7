"""The score stage: every configured reward on every generation, saved beside the generations.

A reward that raises on a batch is retried row by row, so one bad row costs one score and not the batch; rows
it still fails on, and NaN or infinite scores, become None, are written to `quarantine.jsonl` with the reason,
and are counted per reward in the manifest. A reward that returns the wrong number of scores is a bug in that
reward and stops the stage with its name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from posttrain.config import RewardConfig
from posttrain.errors import PosttrainError
from posttrain.rundir import Inputs, StageResult
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


def score_rows(name: str, fn, prompts: list[dict], responses: list[str], batch_size: int) -> tuple[list, list]:
    """Run one reward over all rows in batches. Returns (scores with None for failures, quarantine records)."""
    scores: list[float | None] = []
    quarantine: list[dict] = []
    for start in tqdm(range(0, len(responses), batch_size), desc=f"score {name}", unit="batch"):
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


def score(cfg: RewardConfig, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `cfg`: the recipe's `reward` section (`rewards`: name -> `_target_` config, `primary`,
    `batch_size`); `inputs`: `generations`, and `rm` (a folder) when this round trained a reward model: it is the
    `model` of the reward named `rm`. Writes `scored/`: the generations plus one `reward.<name>` column per
    reward and `score` (the primary reward, which selection ranks by)."""
    ds = datasets.load_from_disk(inputs["generations"])
    rows = ds.to_list()
    prompts = [reward_prompt(r) for r in rows]
    responses = [r["text"] for r in rows]
    lengths = [r["completion_tokens"] for r in rows]
    columns: dict[str, list] = {}
    summary: dict[str, dict] = {}
    quarantine: list[dict] = []
    for name, node in cfg.rewards.items():
        fn = build_reward(with_trained_model(name, node, inputs))
        scores, q = score_rows(name, fn, prompts, responses, cfg.batch_size)
        columns[f"reward.{name}"] = scores
        summary[name] = summarize(scores, lengths, q)
        quarantine += q
    # A primary that is not there this round (the RM, before any preference data exists) falls back to the first.
    primary = cfg.primary if cfg.primary in cfg.rewards else next(iter(cfg.rewards))
    for col, values in columns.items():
        ds = ds.add_column(col, values, feature=datasets.Value("float64"))
    ds = ds.add_column("score", columns[f"reward.{primary}"], feature=datasets.Value("float64"))
    ds.save_to_disk(str(out / "scored"))
    if quarantine:
        with open(out / "quarantine.jsonl", "w") as f:
            for q in quarantine:
                f.write(json.dumps({**q, "prompt_id": rows[q["row"]]["prompt_id"],
                                    "sample_idx": rows[q["row"]]["sample_idx"]}) + "\n")
    return StageResult(
        outputs={"scored": "scored"},
        rows=len(rows),
        metrics={"primary": primary, "rewards": summary, "quarantined": len(quarantine)},
    )
