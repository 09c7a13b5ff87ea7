"""Quality, difficulty and topic columns for the filter stage (Llama 3, section 4.2.3, "Data quality").

They annotate rather than remove (unless asked), because they run before select: the low-scored samples of a
prompt are the rejected side of its DPO pair. Select, and SemanticDedup's quality x difficulty order, read them.

A judge is given either as the name of a column the score stage already wrote (e.g. `reward.judge`, an
`LLMJudge` listed under `reward.rewards`; scores in [0, 1]) or as a Reward (`_target_` config or object), which
is then called here.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any

import datasets
import numpy as np

from reward.filters import FilterContext, FilterResult
from reward.protocol import build_reward
from reward.score import reward_prompt


def rank01(values: list) -> list:
    """Each value's share of the (non-None) values strictly below it, in [0, 1]; None stays None.

    >>> rank01([3.0, None, 1.0, 2.0, 2.0])
    [1.0, None, 0.0, 0.3333333333333333, 0.3333333333333333]
    """
    known = np.sort(np.array([v for v in values if v is not None], dtype=float))
    denom = max(1, len(known) - 1)
    return [None if v is None else float(np.searchsorted(known, v, side="left")) / denom for v in values]


def _judge_scores(judge: Any, rows: datasets.Dataset, index: list[int] | None = None) -> list:
    """A judge's scores for `rows` (or only the rows in `index`): a column name, or a Reward called here."""
    if isinstance(judge, str):
        values = list(rows[judge])
        return values if index is None else [values[i] for i in index]
    fn = build_reward(judge) if isinstance(judge, dict) else judge
    sub = rows if index is None else rows.select(index)
    return list(fn([reward_prompt(r) for r in sub], list(sub["text"])))


class Quality:
    """`quality_high`: the row's `reward` is in the top `top_quantile` of the set (Llama 3: top quartile of the
    RM score) OR the judge gives at least `judge_top` (its top rating is 1.0 on LLMJudge's [0, 1] scale).
    `quality` in [0, 1]: the larger of the reward's rank (see `rank01`) and the judge's score; 1.0 when the row
    is high quality through the judge. `drop_low=True` removes rows that are not high quality (`low_quality`);
    do that only when select should see no other rows (it takes the rejected side of DPO pairs away)."""

    def __init__(self, reward: str = "score", top_quantile: float = 0.25, judge: Any = None,
                 judge_top: float = 1.0, drop_low: bool = False):
        if not 0 < top_quantile <= 1:
            raise ValueError(f"Quality.top_quantile must be in (0, 1], not {top_quantile}")
        self.reward, self.top_quantile, self.judge = reward, top_quantile, judge
        self.judge_top, self.drop_low = judge_top, drop_low

    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult:
        scores = list(rows[self.reward])
        known = [s for s in scores if s is not None]
        cut = float(np.quantile(known, 1 - self.top_quantile)) if known else None
        by_reward = [s is not None and s >= cut for s in scores]
        judged = _judge_scores(self.judge, rows) if self.judge is not None else [None] * len(rows)
        by_judge = [j is not None and j >= self.judge_top for j in judged]
        quality = [max((v for v in (r, j) if v is not None), default=None)
                   for r, j in zip(rank01(scores), judged)]
        high = [a or b for a, b in zip(by_reward, by_judge)]
        reasons = [None if h or not self.drop_low else "low_quality" for h in high]
        return FilterResult(
            reasons,
            columns={"quality": quality, "quality_high": high},
            metrics={"high": sum(high), "high_by_reward": sum(by_reward), "high_by_judge": sum(by_judge),
                     "reward_cut": cut},
        )


class Difficulty:
    """`difficulty` in [0, 1] of each row's prompt, shared by its K samples. Without a judge, a proxy ranked
    across prompts (`rank01`): `spread` (default), the standard deviation of the `reward` its samples got (the
    policy sometimes succeeds, sometimes not), or `low_mean`, how low their mean reward is. With a `judge`
    (e.g. an LLMJudge with a difficulty rubric, 1.0 = hardest): its score of the prompt's best sample, or the
    mean of a judge column over the prompt's samples. None when a prompt has too few scored samples."""

    def __init__(self, proxy: str = "spread", reward: str = "score", judge: Any = None):
        if proxy not in ("spread", "low_mean"):
            raise ValueError(f"Difficulty.proxy must be 'spread' or 'low_mean', not {proxy!r}")
        self.proxy, self.reward, self.judge = proxy, reward, judge

    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult:
        pids, scores = list(rows["prompt_id"]), list(rows[self.reward])
        members: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(pids):
            members[p].append(i)
        per_prompt: dict[str, float | None] = {}
        if isinstance(self.judge, str):
            col = list(rows[self.judge])
            for p, idx in members.items():
                vals = [col[i] for i in idx if col[i] is not None]
                per_prompt[p] = float(np.mean(vals)) if vals else None
        elif self.judge is not None:
            best = [max(idx, key=lambda i: (scores[i] is not None, scores[i] or 0.0)) for idx in members.values()]
            per_prompt = dict(zip(members, _judge_scores(self.judge, rows, best)))
        else:
            for p, idx in members.items():
                vals = [scores[i] for i in idx if scores[i] is not None]
                if self.proxy == "spread":
                    per_prompt[p] = float(np.std(vals)) if len(vals) >= 2 else None
                else:
                    per_prompt[p] = -float(np.mean(vals)) if vals else None
            per_prompt = dict(zip(per_prompt, rank01(list(per_prompt.values()))))
        known = [v for v in per_prompt.values() if v is not None]
        return FilterResult(
            [None] * len(rows),
            columns={"difficulty": [per_prompt[p] for p in pids]},
            metrics={"prompts": len(per_prompt), "unrated_prompts": len(per_prompt) - len(known),
                     "mean": float(np.mean(known)) if known else None},
        )


DEFAULT_TOPICS = {
    "code": ["code", "python", "javascript", "java", "c++", "rust", "sql", "function", "bug", "compile", "regex",
             "script", "algorithm", "api"],
    "math": ["math", "calculate", "equation", "solve", "integral", "derivative", "probability", "sum", "prove",
             "how many", "percent"],
    "writing": ["write", "story", "poem", "essay", "email", "letter", "rewrite", "summarize", "summary"],
}
TOPIC_PROMPT = """Classify the user's request into exactly one of these topics: {labels}.
Reply with the topic name only.

[Request]
{prompt}"""


class Topics:
    """`topic` of each row's prompt (its last user turn), shared by its samples, for the per-topic counts in
    the manifest. Keyword classifier by default: the topic in `keywords` (name -> words or phrases, matched
    case-insensitively on word boundaries) with the most hits, `default` when none hits. With `model` (or a
    generation `backend`), a judge model picks one of the keyword topics' names (or `labels`) greedily instead;
    a reply naming none of them gives `default`. Removes nothing."""

    def __init__(self, keywords: dict[str, list[str]] | None = None, default: str = "general",
                 labels: list[str] | None = None, model: str | None = None, backend: Any = None,
                 max_new_tokens: int = 8):
        self.keywords = DEFAULT_TOPICS if keywords is None else keywords
        self.patterns = {t: re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w.lower()) for w in ws) + r")(?!\w)")
                         for t, ws in self.keywords.items() if ws}
        self.default, self.labels = default, list(labels or self.keywords)
        if model is not None or backend is not None:
            from hydra.utils import instantiate

            if backend is None or isinstance(backend, dict):
                backend = instantiate(backend or {"_target_": "data_gen.hf_backend.HFBackend"}, model=model,
                                      _convert_="all")
        self.backend, self.max_new_tokens = backend, max_new_tokens

    def keyword_topic(self, prompt: str) -> str:
        """The topic of one prompt text by keyword hits.

        >>> Topics().keyword_topic("Write a Python function that sums a list")
        'code'
        """
        hits = {t: len(p.findall(prompt.lower())) for t, p in self.patterns.items()}
        best = max(hits, key=hits.get, default=None)
        return best if best is not None and hits[best] > 0 else self.default

    def _judge_topics(self, prompts: list[str]) -> list[str]:
        from data_gen.backend import Sampling

        requests = [[{"role": "user", "content": TOPIC_PROMPT.format(labels=", ".join(self.labels), prompt=p)}]
                    for p in prompts]
        replies = self.backend.generate(requests, 1, Sampling(temperature=0, max_new_tokens=self.max_new_tokens))
        out = []
        for (reply,) in replies:
            text = reply["text"].lower()
            out.append(next((lab for lab in self.labels if lab.lower() in text), self.default))
        return out

    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult:
        pids = list(rows["prompt_id"])
        first: dict[str, str] = {}
        for p, messages in zip(pids, rows["messages"]):
            if p not in first:
                first[p] = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        prompts = list(first.values())
        found = self._judge_topics(prompts) if self.backend is not None else [self.keyword_topic(p) for p in prompts]
        topic = dict(zip(first, found))
        return FilterResult([None] * len(rows), columns={"topic": [topic[p] for p in pids]},
                            metrics={"prompts_per_topic": dict(Counter(found).most_common())})
