"""Eval suites: each is built from its recipe config (`_target_` + keyword arguments) and called with the stage's
`EvalContext`; it returns flat `{metric: number or None}`, saved under its name in `metrics.json`.

    evals:
      suites:
        reward:   {_target_: evals.suites.RewardSuite}
        win_rate: {_target_: evals.suites.WinRate, reward: rm, against: [previous, teacher]}
        drift:    {_target_: evals.suites.Drift}
        math:     {_target_: evals.suites.VerifiableAccuracy, prompts: pkg://evals/data/tiny_math.jsonl,
                   verifier: {_target_: reward.verifiers.MathAnswer}}
"""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np

from data_gen.prompts import load_prompts
from evals.stage import EvalContext, check_heldout
from posttrain.errors import PosttrainError
from reward.ifeval import count_words
from reward.protocol import build_reward
from reward.score import score_rows, summarize


def _judge(ctx: EvalContext, name: str | None, suite: str) -> str:
    """The reward a suite compares with: its own `reward`, else the recipe's primary reward when the eval has it,
    else the first eval reward."""
    if name is not None:
        return name
    if not ctx.rewards:
        raise PosttrainError(f"eval suite {suite!r} needs a reward: configure evals.rewards (or reward.rewards)")
    return ctx.primary if ctx.primary in ctx.rewards else next(iter(ctx.rewards))


class RewardSuite:
    """Each configured reward over the policy's held-out answers: count, None count, quarantined, mean, std,
    p10 / p50 (median) / p90 and the correlation with answer length in tokens (`reward.score.summarize`)."""

    def __init__(self, rewards: list[str] | None = None):
        self.rewards = rewards

    def __call__(self, ctx: EvalContext) -> dict:
        lengths = [r["completion_tokens"] for r in ctx.responses]
        out = {}
        for name in self.rewards or list(ctx.rewards):
            summary = summarize(ctx.scores(name), lengths, ctx.quarantined[(name, "policy")])
            out.update({f"{name}.{k}": v for k, v in summary.items()})
        return out


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n`.

    >>> [round(x, 4) for x in wilson_interval(7, 10)]
    [0.3968, 0.8922]
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(mine: list, theirs: list, tie_margin: float = 0.0, confidence: float = 0.95) -> dict:
    """Per-prompt comparison of two score lists (aligned by prompt): a win when mine beats theirs by more than
    `tie_margin`, a loss the other way, else a tie; pairs where either score is None are `unscored` and left out.
    win_rate = (wins + ties / 2) / n, with a Wilson score interval that treats the n comparisons as Bernoulli
    trials; a tie (half a win) varies less than a coin flip, so with ties the interval is a little conservative.

    >>> r = win_rate([3, 2, 1, None], [1, 2, 3, 0])
    >>> r["wins"], r["ties"], r["losses"], r["unscored"], r["win_rate"]
    (1, 1, 1, 1, 0.5)
    """
    wins = ties = losses = unscored = 0
    for a, b in zip(mine, theirs, strict=True):
        if a is None or b is None:
            unscored += 1
        elif a - b > tie_margin:
            wins += 1
        elif b - a > tie_margin:
            losses += 1
        else:
            ties += 1
    n = wins + ties + losses
    rate = (wins + ties / 2) / n if n else None
    low, high = wilson_interval(wins + ties / 2, n, confidence) if n else (None, None)
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "wins": wins, "ties": ties, "losses": losses,
            "n": n, "unscored": unscored}


class WinRate:
    """This round's policy against the previous round's policy, the starting policy (`round0`, round 0's eval
    answers) and/or the teacher on the held-out prompts, judged per prompt by one reward: the suite's `reward`, else
    the recipe's `reward.primary` (an LLM judge is a reward too: `reward.judge.LLMJudge`); the manifest's eval entry
    and the report name it. Metrics are `vs_<opponent>.<win_rate|ci_low|ci_high|wins|ties|
    losses|n|unscored>` (see `win_rate`); round 0 is the starting policy, so it has no `vs_previous` and no
    `vs_round0`."""

    OPPONENTS = ("previous", "round0", "teacher")

    def __init__(self, reward: str | None = None, against: list[str] = ("previous", "teacher"),
                 tie_margin: float = 0.0, confidence: float = 0.95):
        unknown = sorted(set(against) - set(self.OPPONENTS))
        if unknown:
            raise PosttrainError(f"WinRate.against: {unknown} unknown; choose from {list(self.OPPONENTS)}")
        if not 0 < confidence < 1:
            raise PosttrainError(f"WinRate.confidence must be in (0, 1), got {confidence}")
        self.reward, self.against, self.tie_margin, self.confidence = reward, list(against), tie_margin, confidence

    def __call__(self, ctx: EvalContext) -> dict:
        sides = {"previous": ctx.previous, "round0": ctx.round0, "teacher": ctx.teacher}
        if all(sides[o] is None for o in self.against if o != "teacher"):
            if "teacher" not in self.against:
                return {}  # round 0, or nothing before it: no opponent, so no judge is needed yet
        reward = _judge(ctx, self.reward, ctx.suite)
        ctx.judged_by[ctx.suite] = reward
        mine = dict(zip((r["prompt_id"] for r in ctx.responses), ctx.scores(reward)))
        out = {}
        for opponent in self.against:
            rows = {"previous": ctx.previous, "round0": ctx.round0, "teacher": ctx.teacher}[opponent]
            if rows is None:
                if opponent != "teacher":
                    continue  # round 0 (nothing before the starting policy), or a run with no eval before this one
                raise PosttrainError(f"eval suite {ctx.suite!r} compares against the teacher, but the eval stage "
                                     f"has no teacher answers: set a teacher, or drop 'teacher' from `against`")
            theirs = dict(zip((r["prompt_id"] for r in rows), ctx.scores(reward, opponent)))
            common = [pid for pid in mine if pid in theirs]  # same held-out set: normally all of them
            result = win_rate([mine[p] for p in common], [theirs[p] for p in common], self.tie_margin,
                              self.confidence)
            out.update({f"vs_{opponent}.{k}": v for k, v in result.items()})
        return out


class IFEvalAccuracy:
    """IFEval's two strict accuracies on the held-out answers, for prompts that carry `constraints`
    (reward/ifeval.py): `prompt_level` (the share of prompts with every constraint met) and `instruction_level`
    (the share of all constraints met, IFEval's inst_level_strict_acc), with `prompts` and `instructions` counted.
    `without` leaves out the prompts that carry any constraint of those types, e.g. `[max_words, max_sentences]`
    for the accuracy on prompts where answering shorter cannot be what helps."""

    def __init__(self, constraints_key: str = "constraints", without: list[str] | None = None):
        from reward.ifeval import CONSTRAINT_PARAMS

        unknown = sorted(set(without or []) - set(CONSTRAINT_PARAMS))
        if unknown:
            raise PosttrainError(f"IFEvalAccuracy.without: unknown constraint types {unknown}; known: "
                                 f"{sorted(CONSTRAINT_PARAMS)}")
        self.constraints_key, self.without = constraints_key, set(without or [])

    def __call__(self, ctx: EvalContext) -> dict:
        from reward.ifeval import check_constraint

        prompts = met_all = met = total = 0
        for row in ctx.responses:
            constraints = json.loads(row.get("meta") or "{}").get(self.constraints_key) or []
            if isinstance(constraints, str):
                constraints = json.loads(constraints)
            if any(c["type"] in self.without for c in constraints):
                continue
            verdicts = [check_constraint(c, row["text"]) for c in constraints]
            if verdicts:
                prompts, met_all = prompts + 1, met_all + all(verdicts)
                met, total = met + sum(verdicts), total + len(verdicts)
        return {"prompt_level": met_all / prompts if prompts else None,
                "instruction_level": met / total if total else None, "prompts": prompts, "instructions": total}


class VerifiableAccuracy:
    """The policy's accuracy on its own prompt set checked by a rule verifier (`reward.verifiers.MathAnswer` on
    prompts with an `answer`, `reward.verifiers.InstructionFollowing` on prompts with `constraints`). Answers come
    from the eval backend with the eval sampling and are kept in `<suite>/answers.jsonl`. Metrics: `accuracy`
    (mean verifier score), `fully_correct` (share scoring 1.0: IFEval's strict prompt-level accuracy for
    instruction following), `n` scored and `unscored` (None: the prompt carried nothing to check)."""

    def __init__(self, prompts: str, verifier: dict, limit: int | None = None, split: str = "train"):
        self.prompts, self.limit, self.split = prompts, limit, split
        self.verifier_cfg = verifier
        self.verifier = build_reward(verifier)

    def __call__(self, ctx: EvalContext) -> dict:
        prompts = load_prompts(self.prompts, split=self.split).prompts[: self.limit]
        if ctx.training_prompts:  # this set is held out too
            check_heldout(prompts, ctx.training_prompts, self.split)
        answers = ctx.generate([p["messages"] for p in prompts])
        texts = [a["text"] for a in answers]
        reward_prompts = [{**p["meta"], "prompt_id": p["prompt_id"], "messages": p["messages"]} for p in prompts]
        scores, _ = score_rows(ctx.suite, self.verifier, reward_prompts, texts, ctx.batch_size)
        (ctx.out / ctx.suite).mkdir(parents=True, exist_ok=True)
        with open(ctx.out / ctx.suite / "answers.jsonl", "w") as f:
            for p, a, s in zip(prompts, answers, scores):
                f.write(json.dumps({"prompt_id": p["prompt_id"], "messages": p["messages"], **a, "score": s}) + "\n")
        scored = [s for s in scores if s is not None]
        return {
            "accuracy": float(np.mean(scored)) if scored else None,
            "fully_correct": float(np.mean([s == 1.0 for s in scored])) if scored else None,
            "n": len(scored),
            "unscored": len(scores) - len(scored),
        }


# Openers of a refusal or a hedge, matched case-insensitively anywhere in the answer.
REFUSAL_PHRASES = (
    "i'm sorry", "i am sorry", "i apologize", "i cannot", "i can't", "i can not", "i'm unable", "i am unable",
    "i won't", "i will not", "i'm not able to", "i am not able to", "as an ai", "as a language model",
)


def distinct_n(texts: list[str], n: int) -> float | None:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all n-grams, pooled over the answers (lower-cased,
    split on whitespace). Falls as answers grow repetitive or alike.

    >>> distinct_n(["a b a b", "a b"], 2)
    0.5
    """
    grams = [tuple(w[i : i + n]) for w in (t.casefold().split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def pearson(xs: list, ys: list) -> float | None:
    """Pearson correlation over the pairs where neither value is None; None when undefined."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 2:
        return None
    a, b = np.array(pairs, dtype=float).T
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else None


class Drift:
    """How the answers change shape across rounds, whatever the reward says (RLHFlow saw iterative DPO answers
    grow longer every round): `mean_words`, `mean_tokens`, `truncated_rate` (stopped by max_new_tokens),
    `distinct_1` / `distinct_2`, `refusal_rate` (answers holding a phrase of `refusal_phrases`), `empty_rate`
    (blank answers, which every IFEval constraint fails) and
    `corr_reward_length`, the Pearson correlation of the reward (`reward`, default the recipe's primary reward,
    else the first) with length in tokens: a reward that grows with length invites the drift."""

    def __init__(self, reward: str | None = None, refusal_phrases: list[str] | None = None):
        self.reward = reward
        self.refusal_phrases = [p.casefold() for p in (refusal_phrases or REFUSAL_PHRASES)]

    def __call__(self, ctx: EvalContext) -> dict:
        texts = [r["text"] for r in ctx.responses]
        tokens = [r["completion_tokens"] for r in ctx.responses]
        normalised = [t.casefold().replace("\u2019", "'") for t in texts]
        out = {
            "mean_words": float(np.mean([count_words(t) for t in texts])),
            "mean_tokens": float(np.mean(tokens)),
            "truncated_rate": float(np.mean([r["finish_reason"] == "length" for r in ctx.responses])),
            "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2),
            "refusal_rate": float(np.mean([any(p in t for p in self.refusal_phrases) for t in normalised])),
            "empty_rate": float(np.mean([not t.strip() for t in texts])),
        }
        if self.reward is not None or ctx.rewards:
            out["corr_reward_length"] = pearson(ctx.scores(_judge(ctx, self.reward, ctx.suite)), tokens)
        return out
