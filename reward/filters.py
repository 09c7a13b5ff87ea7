"""The filter stage: data-quality filters between score and select (Llama 3, section 4.2.3, "Data quality").

A filter is any callable `(rows: datasets.Dataset, context: FilterContext) -> FilterResult`, named by `_target_`
in the recipe's `filter.filters` (name -> config, applied in order; rows one filter removes never reach the
next). The result gives, per row, None (keep) or a reason `"category: detail"`, and may add columns that later
filters and select can read. Built in:
- `reward.filters.RuleFilter`: empty, cut off at max length, emoji, exclamation marks, apologies, "As an AI",
  repeated lines or n-grams;
- `reward.dedup.TextDedup`: exact (normalised-text hash) and near (MinHash/LSH) duplicates, within the round and
  against earlier rounds' SFT data;
- `reward.dedup.SemanticDedup`: embed, cluster, keep by quality x difficulty under a cosine threshold;
- `reward.quality.Quality`, `Difficulty`, `Topics`: columns `quality`/`quality_high`, `difficulty`, `topic`.

The stage sits before select, so it sees all K samples of every prompt. Rows removed here are no candidates for
best-of-K or for a DPO pair; the annotating filters (quality, difficulty, topic) remove nothing unless asked.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import datasets
import numpy as np

from posttrain.config import FilterConfig
from posttrain.errors import PosttrainError
from posttrain.rundir import Inputs, StageResult
from reward.protocol import build_reward


@dataclass
class FilterContext:
    """What a filter may need beyond the rows: the response texts of earlier rounds' SFT data."""

    previous_texts: list[str] = field(default_factory=list)


@dataclass
class FilterResult:
    """`reasons[i]`: None keeps row i, a string `"category: detail"` removes it; `columns`: new per-row columns
    (one value per input row); `metrics`: anything worth recording in the manifest."""

    reasons: list[str | None]
    columns: dict[str, list] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


class Filter(Protocol):
    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult: ...


def category(reason: str) -> str:
    return reason.split(":", 1)[0]


def load_previous_texts(paths: list[str]) -> list[str]:
    """Response texts of earlier rounds' SFT datasets."""
    return [t for p in paths for t in datasets.load_from_disk(p)["text"]]


def _set_column(ds: datasets.Dataset, name: str, values: list) -> datasets.Dataset:
    if name in ds.column_names:
        ds = ds.remove_columns(name)
    return ds.add_column(name, [v.item() if isinstance(v, np.generic) else v for v in values])


def filter_stage(cfg: FilterConfig, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `cfg`: the recipe's `filter` section (`filters`: name -> `_target_` config, in order);
    `inputs`: `scored` (from the score stage) and optionally `previous_sft`, the list of earlier rounds' SFT
    folders (a response already trained on is not trained on again). Writes
    `kept/` (the scored columns plus any added by filters) and `removed/` (the same plus `filter` and `reason`);
    the manifest records per filter the rows it saw and removed, by reason, and the kept rows per topic."""
    ds = datasets.load_from_disk(inputs["scored"])
    n = len(ds)
    context = FilterContext(previous_texts=load_previous_texts(list(inputs.get("previous_sft") or [])))
    alive = np.arange(n)
    removed_by: dict[int, tuple[str, str]] = {}
    report: dict[str, dict] = {}
    for name, node in cfg.filters.items():
        fn = build_reward(node)
        sub = ds.select(alive)
        result = fn(sub, context)
        if len(result.reasons) != len(sub) or any(len(v) != len(sub) for v in result.columns.values()):
            raise PosttrainError(f"filter {name!r} returned results for a different number of rows than {len(sub)}")
        for col, values in result.columns.items():
            full = list(ds[col]) if col in ds.column_names else [None] * n
            for i, v in zip(alive, values):
                full[i] = v
            ds = _set_column(ds, col, full)
        counts = Counter(category(r) for r in result.reasons if r is not None)
        for i, r in zip(alive, result.reasons):
            if r is not None:
                removed_by[int(i)] = (name, r)
        alive = np.array([i for i, r in zip(alive, result.reasons) if r is None], dtype=np.int64)
        report[name] = {"rows_in": len(sub), "removed": sum(counts.values()), "reasons": dict(sorted(counts.items())),
                        **result.metrics}

    kept = ds.select(alive)
    kept.save_to_disk(str(out / "kept"), num_shards=1 if not len(kept) else None)
    gone = sorted(removed_by)
    extra = {"filter": [removed_by[i][0] for i in gone], "reason": [removed_by[i][1] for i in gone]}
    features = datasets.Features({**ds.features, **{k: datasets.Value("string") for k in extra}})
    if gone:
        removed = ds.select(gone)
        for col, values in extra.items():
            removed = removed.add_column(col, values, feature=features[col])
    else:  # add_column cannot add to an empty table
        removed = datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    removed.save_to_disk(str(out / "removed"), num_shards=1 if not gone else None)  # 0 shards would not reload
    metrics = {"rows_in": n, "rows_out": len(kept), "previous_texts": len(context.previous_texts),
               "filters": report}
    if "topic" in kept.column_names:
        metrics["topics"] = dict(Counter(kept["topic"]).most_common())
    return StageResult(outputs={"kept": "kept", "removed": "removed"},
                       rows={"kept": len(kept), "removed": len(gone)}, metrics=metrics)


# ---- rule-based cleaning ---------------------------------------------------------------------------------------

APOLOGIES = ("i'm sorry", "i am sorry", "i apologize", "i apologise", "my apologies")
# Tone tells, not refusals: safety data needs plain refusals ("I can't help with that"), so those stay.
AI_DISCLAIMERS = ("as an ai", "as a language model", "as an artificial intelligence")
_EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F]")
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.DOTALL)


def _count_phrases(text: str, phrases) -> int:
    low = text.lower().replace("\u2019", "'")
    return sum(low.count(p) for p in phrases)


class RuleFilter:
    """Rule-based cleaning (Llama 3, section 4.2.3). A response is removed, with the first rule it breaks as the
    reason, when it is empty or whitespace only (`empty`), was cut off at the length limit (`truncated`, from
    `finish_reason == "length"`), or has more than `max_emoji` emoji (`emoji`), `max_exclamations` "!" (`exclamation`),
    `max_apologies` apology phrases (`apology`), `max_disclaimers` "As an AI"-style phrases (`ai_disclaimer`), a
    line of at least `min_line_chars` characters more than `max_line_repeats` times (`repeated_line`), or a word
    `repeat_ngram`-gram more than `max_ngram_repeats` times (`repeated_ngram`). Emoji, "!" and phrases are
    counted outside code (fenced blocks and inline code). A threshold of None turns its rule off.

    >>> f = RuleFilter()
    >>> f.reason("Great question!!!!!! Sure!", "stop"), f.reason("   ", "stop"), f.reason("Paris.", "stop")
    ('exclamation: 7 > 5', 'empty', None)
    """

    def __init__(
        self,
        drop_truncated: bool = True,
        max_emoji: int | None = 5,
        max_exclamations: int | None = 5,
        apology_phrases: list[str] | tuple[str, ...] = APOLOGIES,
        max_apologies: int | None = 1,
        disclaimer_phrases: list[str] | tuple[str, ...] = AI_DISCLAIMERS,
        max_disclaimers: int | None = 0,
        min_line_chars: int = 10,
        max_line_repeats: int | None = 3,
        repeat_ngram: int = 5,
        max_ngram_repeats: int | None = 8,
    ):
        self.drop_truncated = drop_truncated
        self.max_emoji, self.max_exclamations = max_emoji, max_exclamations
        self.apology_phrases = tuple(p.lower() for p in apology_phrases)
        self.disclaimer_phrases = tuple(p.lower() for p in disclaimer_phrases)
        self.max_apologies, self.max_disclaimers = max_apologies, max_disclaimers
        self.min_line_chars, self.max_line_repeats = min_line_chars, max_line_repeats
        self.repeat_ngram, self.max_ngram_repeats = repeat_ngram, max_ngram_repeats

    def reason(self, text: str, finish_reason: str | None = None) -> str | None:
        """Why a response breaks a rule (`"category: detail"`), or None when it breaks none."""
        if not text.strip():
            return "empty"
        if self.drop_truncated and finish_reason == "length":
            return "truncated: finish_reason=length"
        prose = _CODE.sub(" ", text)
        counts = [
            ("emoji", len(_EMOJI.findall(prose)), self.max_emoji),
            ("exclamation", prose.count("!") - prose.count("!="), self.max_exclamations),
            ("apology", _count_phrases(prose, self.apology_phrases), self.max_apologies),
            ("ai_disclaimer", _count_phrases(prose, self.disclaimer_phrases), self.max_disclaimers),
        ]
        for name, count, limit in counts:
            if limit is not None and count > limit:
                return f"{name}: {count} > {limit}"
        if self.max_line_repeats is not None:
            lines = Counter(s for s in (line.strip() for line in text.splitlines()) if len(s) >= self.min_line_chars)
            if lines:
                line, count = lines.most_common(1)[0]
                if count > self.max_line_repeats:
                    return f"repeated_line: {count} x {line[:40]!r}"
        if self.max_ngram_repeats is not None:
            words = re.findall(r"\w+", text.lower())
            k = self.repeat_ngram
            grams = Counter(tuple(words[i : i + k]) for i in range(len(words) - k + 1))
            if grams:
                gram, count = grams.most_common(1)[0]
                if count > self.max_ngram_repeats:
                    return f"repeated_ngram: {count} x {' '.join(gram)!r}"
        return None

    def __call__(self, rows: datasets.Dataset, context: FilterContext) -> FilterResult:
        finish = rows["finish_reason"] if "finish_reason" in rows.column_names else [None] * len(rows)
        return FilterResult([self.reason(t, f) for t, f in zip(rows["text"], finish)])
