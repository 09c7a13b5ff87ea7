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

Each filter's result is saved as it finishes (`checkpoints/NN_<name>.arrow`): a stage cut short resumes from the
next filter. A filter is handed its rows as a file-backed dataset (the rows still in, with the columns added so
far, written out once per filter), and the stage writes `kept/` and `removed/` in one streaming pass, so no step
holds the rows themselves in memory. The rule filter and text dedup read them in batches
(posttrain.shards.iter_columns) and keep a value, hash or signature a row; semantic dedup keeps an embedding a
row, and the quality, difficulty and topic annotators a value a row (topics read each row's prompt).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import datasets
import numpy as np
import pyarrow as pa

from posttrain.config import FilterConfig
from posttrain.errors import PosttrainError
from posttrain.rundir import Inputs, StageResult
from posttrain.shards import count_rows, iter_columns, publish, write_batches
from reward.protocol import build_reward


@dataclass
class FilterContext:
    """What a filter may need beyond the rows: the response texts of earlier rounds' SFT data."""

    previous_texts: Sequence[str] = field(default_factory=list)  # a list, or PreviousTexts read from disk


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


class PreviousTexts(Sequence):
    """The response texts of earlier rounds' SFT datasets, read from disk in batches each time they are iterated
    (six rounds of 50,000 prompts are ~600 MB of text), never held as a list."""

    def __init__(self, paths: list[str]):
        self.paths = list(paths)
        self._sizes = [count_rows(p) for p in self.paths]

    def __len__(self) -> int:
        return sum(self._sizes)

    def __iter__(self) -> Iterator[str]:
        for path in self.paths:
            for table in iter_columns(path, ["text"], 4096):
                yield from table.column("text").to_pylist()

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        for path, size in zip(self.paths, self._sizes):
            if i < size:
                return datasets.load_from_disk(path)[i]["text"]
            i -= size


def load_previous_texts(paths: list[str]) -> PreviousTexts:
    """Response texts of earlier rounds' SFT datasets (streamed, see PreviousTexts)."""
    return PreviousTexts(paths)


def _plain(values: list) -> list:
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def _with_added(folder: str, added: dict[str, list], take: np.ndarray | None,
                extra: dict[str, list] | None = None) -> Iterator[pa.Table]:
    """The rows of `folder` where `take` (a boolean mask over its rows; None: all), with the `added` columns (one
    value per row of `folder`) and `extra` columns (one value per row taken) appended, in batches."""
    start = done = 0
    for table in iter_columns(folder, None, 4096):
        rows = np.arange(start, start + len(table))
        start += len(table)
        if take is not None:
            mask = take[rows]
            table, rows = table.filter(pa.array(mask)), rows[mask]
        for name, values in added.items():
            table = table.append_column(name, pa.array(_plain([values[i] for i in rows])))
        for name, values in (extra or {}).items():
            table = table.append_column(name, pa.array(values[done : done + len(table)], pa.string()))
        done += len(table)
        yield table


def _features(folder: str, added: dict[str, list], extra: tuple[str, ...] = ()) -> datasets.Features:
    features = datasets.load_from_disk(folder).features.copy()
    for name, values in added.items():
        features[name] = datasets.Features.from_arrow_schema(pa.schema([(name, pa.array(_plain(values)).type)]))[name]
    features.update({name: datasets.Value("string") for name in extra})
    return features


def _checkpoint(path: Path, alive: np.ndarray, result: FilterResult) -> None:
    """A filter's result for the rows it saw (their numbers in the stage's input), written atomically."""
    columns = {"row": pa.array(alive, pa.int64()), "reason": pa.array(result.reasons, pa.string())}
    columns.update({f"column.{k}": pa.array(_plain(list(v))) for k, v in result.columns.items()})
    table = pa.table(columns, metadata={"metrics": json.dumps(result.metrics, default=str)})
    tmp = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    tmp.replace(path)


def _load_checkpoint(path: Path) -> tuple[np.ndarray, FilterResult]:
    with pa.OSFile(str(path)) as f:
        table = pa.ipc.open_stream(f).read_all()
    columns = {k.removeprefix("column."): table.column(k).to_pylist() for k in table.column_names
               if k.startswith("column.")}
    return (np.asarray(table.column("row").to_numpy(), dtype=np.int64),
            FilterResult(table.column("reason").to_pylist(), columns,
                         json.loads(table.schema.metadata[b"metrics"])))


def filter_stage(cfg: FilterConfig, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `cfg`: the recipe's `filter` section (`filters`: name -> `_target_` config, in order);
    `inputs`: `scored` (from the score stage) and optionally `previous_sft`, the list of earlier rounds' SFT
    folders (a response already trained on is not trained on again). Writes
    `kept/` (the scored columns plus any added by filters) and `removed/` (the same plus `filter` and `reason`);
    the manifest records per filter the rows it saw and removed, by reason, and the kept rows per topic."""
    started = time.perf_counter()
    source = inputs["scored"]
    n = len(datasets.load_from_disk(source))
    context = FilterContext(previous_texts=load_previous_texts(list(inputs.get("previous_sft") or [])))
    alive = np.arange(n)
    added: dict[str, list] = {}  # columns filters added: one value per input row (None where unseen)
    removed_by: dict[int, tuple[str, str]] = {}
    report: dict[str, dict] = {}
    checkpoints, scratch = out / "checkpoints", out / "scratch"
    checkpoints.mkdir(exist_ok=True)
    for j, (name, node) in enumerate(cfg.filters.items()):
        saved = checkpoints / f"{j:02d}_{name}.arrow"
        if saved.exists():  # finished by an attempt cut short
            seen, result = _load_checkpoint(saved)
            if not np.array_equal(seen, alive):
                raise PosttrainError(f"filter {name!r}: its checkpoint {saved} is for other rows; delete the stage "
                                     f"folder to start it again")
        else:
            if len(alive) == n and not added:
                sub = datasets.load_from_disk(source)
            else:  # the rows still in, with the columns added so far, as a file the filter reads in batches
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir()
                take = np.zeros(n, dtype=bool)
                take[alive] = True
                write_batches(scratch / "rows.arrow", _with_added(source, added, take), _features(source, added))
                sub = datasets.Dataset.from_file(str(scratch / "rows.arrow"))
            fn = build_reward(node)
            result = fn(sub, context)
            if len(result.reasons) != len(sub) or any(len(v) != len(sub) for v in result.columns.values()):
                raise PosttrainError(f"filter {name!r} returned results for a different number of rows than "
                                     f"{len(sub)}")
            del sub
            _checkpoint(saved, alive, result)
        for col, values in result.columns.items():
            full = added.get(col) or [None] * n
            for i, v in zip(alive, values):
                full[i] = v
            added[col] = full
        counts = Counter(category(r) for r in result.reasons if r is not None)
        for i, r in zip(alive, result.reasons):
            if r is not None:
                removed_by[int(i)] = (name, r)
        alive = np.array([i for i, r in zip(alive, result.reasons) if r is None], dtype=np.int64)
        report[name] = {"rows_in": len(result.reasons), "removed": sum(counts.values()),
                        "reasons": dict(sorted(counts.items())), **result.metrics}
    shutil.rmtree(scratch, ignore_errors=True)

    keep = np.zeros(n, dtype=bool)
    keep[alive] = True
    kept_features = _features(source, added)
    write_batches(out / "kept.arrow", _with_added(source, added, keep), kept_features)
    publish([out / "kept.arrow"], out / "kept", kept_features)
    gone = sorted(removed_by)
    extra = {"filter": [removed_by[i][0] for i in gone], "reason": [removed_by[i][1] for i in gone]}
    features = _features(source, added, tuple(extra))
    write_batches(out / "removed.arrow", _with_added(source, added, ~keep, extra), features)
    publish([out / "removed.arrow"], out / "removed", features)
    for work in (out / "kept.arrow", out / "removed.arrow"):
        work.unlink()
    for saved in sorted(checkpoints.iterdir(), reverse=True):  # last filter first: what a kill leaves is a prefix
        saved.unlink()
    checkpoints.rmdir()
    seconds = time.perf_counter() - started
    metrics = {"rows_in": n, "rows_out": len(alive), "previous_texts": len(context.previous_texts),
               "filters": report, "throughput": {"rows": n, "seconds": round(seconds, 3),
                                                 "rows_per_s": round(n / seconds, 2) if seconds > 0 else None}}
    if "topic" in added:
        metrics["topics"] = dict(Counter(added["topic"][i] for i in alive).most_common())
    return StageResult(outputs={"kept": "kept", "removed": "removed"},
                       rows={"kept": len(alive), "removed": len(gone)}, metrics=metrics)


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
        has_finish = "finish_reason" in rows.column_names
        reasons = []
        for table in iter_columns(rows, ["text", "finish_reason"] if has_finish else ["text"]):
            finish = table.column("finish_reason").to_pylist() if has_finish else [None] * len(table)
            reasons += [self.reason(t, f) for t, f in zip(table.column("text").to_pylist(), finish)]
        return FilterResult(reasons)
