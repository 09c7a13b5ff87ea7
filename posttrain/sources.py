"""Data a user brings: prompt pools, SFT sets and preference sets, in TRL's dataset formats.

A source is a path (JSONL, JSON, parquet, a `datasets` folder saved with save_to_disk, ``pkg://...``) or a hub
dataset id (read with `datasets.load_dataset` when the hub is reachable), written in a recipe as a string or as
a mapping::

    sft:
      data:
        - /data/tulu_sft.jsonl                                   # weight 1, TRL's column names
        - {path: /data/ultrafeedback.parquet, weight: 0.5}       # half its rows (a seeded draw)
        - {path: org/dataset, split: train_sft, columns: {prompt: instruction, completion: output}}

`columns` maps a field posttrain reads to the source's own column name. The formats (TRL's names):

- prompts: `messages` (a trailing assistant turn, as in an SFT set, is dropped) or `prompt` (text or messages);
- SFT: conversational language modeling `messages` (the last turn is the assistant's answer; earlier turns are
  the prompt), or prompt-completion `prompt` + `completion` (text or messages). Plain `text` rows have no prompt
  and are refused: posttrain trains on answers to prompts;
- preference: `prompt` + `chosen` + `rejected` (explicit prompt), or `chosen` + `rejected` holding whole
  conversations or texts that share the prompt (implicit prompt, extracted with TRL's `extract_prompt`); the
  reward-model stage also reads ranked rows, `prompt`/`messages` + `responses` (best first).

Every row is checked; a bad one raises SourceError naming the recipe key, the file, the row and the column.
The weight scales a source's rows in the round's mix (open-instruct's dataset_mixer fractions): 0.5 keeps a
seeded half, 2 repeats every row twice; for prompt pools it is the source's share of each round's prompts.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError
from posttrain.models import resolve_path

ROLES = ("system", "user", "assistant", "ipython", "tool")
FIELDS = ("id", "prompt_id", "prompt", "completion", "messages", "chosen", "rejected", "responses", "text")
KINDS = ("prompts", "sft", "pairs", "ranked")


class SourceError(PosttrainError):
    pass


@dataclass(frozen=True)
class Source:
    path: str
    columns: dict = field(default_factory=dict)
    weight: float = 1.0
    split: str = "train"
    key: str = ""  # the recipe key it came from, for messages

    def __str__(self) -> str:
        return f"{self.key}: {self.path}" if self.key else self.path

    def spec(self) -> str | dict:
        """As a recipe writes it: the bare path when nothing else is set."""
        if not self.columns and self.weight == 1.0 and self.split == "train":
            return self.path
        return {"path": self.path, "columns": dict(self.columns), "weight": self.weight, "split": self.split}


def parse_sources(value: Any, key: str, split: str = "train") -> list[Source]:
    """A recipe value (a string, a mapping, or a list of them) -> sources; raises SourceError naming the key."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    items = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(value, (list, tuple)) and not value:
        return []
    out = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise SourceError(f"{where}: a source is a path or {{path, columns, weight, split}}, not {item!r}")
        unknown = set(item) - {"path", "columns", "weight", "split"}
        if unknown:
            raise SourceError(f"{where}: unknown key(s) {sorted(unknown)}; a source takes path, columns, weight, "
                              f"split")
        if not isinstance(item.get("path"), str) or not item["path"].strip():
            raise SourceError(f"{where}.path: a file, folder or hub dataset id is required")
        columns = item.get("columns") or {}
        if not isinstance(columns, dict) or not all(isinstance(v, str) for v in columns.values()):
            raise SourceError(f"{where}.columns: a mapping of field -> your column name, e.g. {{prompt: question}}")
        bad = sorted(set(columns) - set(FIELDS))
        if bad:
            raise SourceError(f"{where}.columns: {bad} are not fields posttrain reads; map one of {list(FIELDS)} "
                              f"to your column (field: column)")
        weight = item.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise SourceError(f"{where}.weight: must be a number > 0, got {weight!r}")
        out.append(Source(path=item["path"], columns=dict(columns), weight=float(weight),
                          split=str(item.get("split", split)), key=where))
    return out


# ---- reading rows ------------------------------------------------------------------------------------------------


def _local(source: Source) -> tuple[Path, bool]:
    """(the path a source names, whether it is a hub dataset id rather than a local path)."""
    try:
        p = resolve_path(source.path)
    except ValueError as e:
        raise SourceError(f"{source}: {e}") from None
    path = source.path
    looks_local = path.startswith(("/", ".", "~", "pkg://")) or Path(path).suffix in (".jsonl", ".json", ".parquet")
    return p, not p.exists() and not looks_local and path.count("/") == 1


def locate(source: Source) -> Path | None:
    """The local file or folder a source names, or None for a hub dataset id. Raises SourceError when a path
    does not exist."""
    p, hub = _local(source)
    if hub:
        return None
    if not p.exists():
        raise SourceError(f"{source}: {source.path} does not exist")
    return p


def fingerprint_path(source: Source) -> str:
    """What the run directory fingerprints for a source: its local path (existing or not: a dry run plans with
    files it does not have), or the hub id as given."""
    p, hub = _local(source)
    return source.path if hub else str(p)


def _jsonl(path: Path, source: Source) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark some editors write: not part of the row
            try:
                line = raw.decode("utf-8")  # CRLF line ends are whitespace to the JSON parser
            except UnicodeDecodeError as e:
                raise SourceError(f"{source}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SourceError(f"{source}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{source}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{source}:{lineno}", row


def _dataset_rows(ds, source: Source) -> Iterator[tuple[str, dict]]:
    import datasets

    if isinstance(ds, (datasets.DatasetDict, dict)):
        if source.split not in ds:
            raise SourceError(f"{source}: no split '{source.split}' (has {sorted(ds)}); set its split")
        ds = ds[source.split]
    for i, row in enumerate(ds):
        yield f"{source} row {i}", row


def raw_rows(source: Source) -> Iterator[tuple[str, dict]]:
    """(where, row) for every row of a source, before its column mapping; `where` names the key, file and row."""
    import datasets

    p = locate(source)
    if p is None:
        try:
            ds = datasets.load_dataset(source.path, split=source.split)
        except Exception as e:  # noqa: BLE001 - offline, unknown id, no such split: all named the same way
            raise SourceError(f"{source}: not a local file or folder, and the hub dataset could not be loaded "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
        yield from _dataset_rows(ds, source)
    elif p.is_dir():
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - re-raised with the path named
            raise SourceError(f"{source}: not a dataset saved with save_to_disk ({e})") from None
        yield from _dataset_rows(ds, source)
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(p)
        except Exception as e:  # noqa: BLE001
            raise SourceError(f"{source}: not a parquet file ({e})") from None
        i = 0
        for batch in table.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{source} row {i}", row
                i += 1
    elif p.suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            if e.msg == "Extra data":  # JSON Lines under a .json name
                yield from _jsonl(p, source)
                return
            raise SourceError(f"{source}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise SourceError(f"{source}: a JSON file holds a list of row objects (or {{\"data\": [...]}})")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise SourceError(f"{source} row {i}: expected a JSON object, got {type(row).__name__}")
            yield f"{source} row {i}", row
    else:
        yield from _jsonl(p, source)


def rows(source: Source) -> Iterator[tuple[str, dict]]:
    """(where, row) with the source's `columns` mapping applied: row[field] is the value of the mapped column."""
    mapping = source.columns
    for where, row in raw_rows(source):
        if mapping:
            missing = [c for c in mapping.values() if c not in row]
            if missing:
                raise SourceError(f"{where}: no column {missing[0]!r} (named in {source.key or 'the'} columns); "
                                  f"the row has {sorted(row)}")
            renamed = {f: row[c] for f, c in mapping.items()}
            # A mapped format wins: an unmapped `messages` (or `prompt`/`completion`) column the source also has
            # would otherwise be read first.
            rival = {"messages", "text"} if {"prompt", "completion"} & set(mapping) else (
                {"prompt", "completion", "text"} if "messages" in mapping else set())
            row = {**{k: v for k, v in row.items() if k not in mapping.values() and k not in rival - set(mapping)},
                   **renamed}
        yield where, row


# ---- checking and converting rows --------------------------------------------------------------------------------


def messages(where: str, column: str, value: Any, allow_empty: bool = False) -> list[dict]:
    """A list of {role, content} chat messages, checked; extra keys of each message are dropped."""
    if not isinstance(value, list) or (not value and not allow_empty):
        raise SourceError(f"{where}, column {column!r}: must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise SourceError(f"{where}, column {column!r}: message {j} must have 'role' in {ROLES} and a string "
                              f"'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _turns(where: str, column: str, value: Any) -> list[dict]:
    """A prompt column: text (one user turn) or messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return messages(where, column, value)


def _answer(where: str, column: str, value: Any) -> str:
    """A completion column: text, or a list holding exactly one assistant message."""
    if isinstance(value, str):
        text = value
    else:
        msgs = messages(where, column, value)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise SourceError(f"{where}, column {column!r}: a completion is one assistant message (got roles "
                              f"{[m['role'] for m in msgs]})")
        text = msgs[0]["content"]
    if not text.strip():
        raise SourceError(f"{where}, column {column!r}: empty answer")
    return text


def _check_prompt(where: str, column: str, msgs: list[dict]) -> list[dict]:
    if not msgs or msgs[-1]["role"] == "assistant":
        raise SourceError(f"{where}, column {column!r}: a prompt ends with a user (or system/tool) turn, before "
                          f"the answer")
    if not any(m["content"].strip() for m in msgs if m["role"] != "system"):
        raise SourceError(f"{where}, column {column!r}: empty prompt")
    return msgs


def prompt_id(row: dict, msgs: list[dict]) -> str:
    for key in ("prompt_id", "id"):
        if row.get(key) is not None:
            return str(row[key])
    return hashlib.sha256(json.dumps(msgs, sort_keys=True).encode()).hexdigest()[:12]


def prompt_of(where: str, row: dict) -> list[dict]:
    """The prompt turns of a prompt-pool row: `messages` (a trailing assistant answer dropped) or `prompt`."""
    if row.get("messages") is not None:
        msgs = messages(where, "messages", row["messages"])
        while msgs and msgs[-1]["role"] == "assistant":  # an SFT set used as prompts: its answer is not the prompt
            msgs = msgs[:-1]
        if not msgs:
            raise SourceError(f"{where}, column 'messages': only assistant turns, no prompt")
        return msgs
    if row.get("prompt") is not None:
        return _turns(where, "prompt", row["prompt"])
    raise SourceError(f"{where}: needs a 'messages' or a 'prompt' field (has {sorted(row)}); map yours with "
                      f"columns: {{prompt: <your column>}}")


def sft_row(where: str, row: dict) -> dict:
    """A TRL language-modeling or prompt-completion row -> {prompt_id, messages, text}."""
    if row.get("messages") is not None:
        msgs = messages(where, "messages", row["messages"])
        if msgs[-1]["role"] != "assistant":
            raise SourceError(f"{where}, column 'messages': the last turn is the answer trained on and must be the "
                              f"assistant's (got {msgs[-1]['role']!r})")
        prompt, text = _check_prompt(where, "messages", msgs[:-1]), msgs[-1]["content"]
        if not text.strip():
            raise SourceError(f"{where}, column 'messages': the assistant's answer is empty")
    elif row.get("prompt") is not None and row.get("completion") is not None:
        prompt = _check_prompt(where, "prompt", _turns(where, "prompt", row["prompt"]))
        text = _answer(where, "completion", row["completion"])
    elif row.get("text") is not None:
        raise SourceError(f"{where}: a plain 'text' row (language modeling) has no prompt and answer; give "
                          f"'messages' or 'prompt' + 'completion'")
    else:
        raise SourceError(f"{where}: needs 'messages' or 'prompt' + 'completion' columns (has {sorted(row)}); map "
                          f"yours with columns: {{prompt: <column>, completion: <column>}}")
    return {"prompt_id": prompt_id(row, prompt), "messages": prompt, "text": text}


def pair_row(where: str, row: dict) -> dict:
    """A TRL preference row (explicit or implicit prompt, text or conversational), or posttrain's own pairs
    (`messages` + chosen/rejected texts) -> {prompt_id, messages, chosen, rejected}."""
    from trl.data_utils import extract_prompt

    for column in ("chosen", "rejected"):
        if row.get(column) is None:
            raise SourceError(f"{where}: needs 'chosen' and 'rejected' columns (has {sorted(row)}); map yours with "
                              f"columns: {{chosen: <column>, rejected: <column>}}")
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise SourceError(f"{where}, column 'rejected': 'chosen' and 'rejected' must both be text or both messages")
    if isinstance(chosen, list):
        chosen = messages(where, "chosen", chosen)
        rejected = messages(where, "rejected", rejected)
        if chosen[0]["role"] != "assistant":  # whole conversations: the prompt is their shared beginning
            parts = extract_prompt({"chosen": chosen, "rejected": rejected})
            prompt = _check_prompt(where, "chosen", parts["prompt"])
            chosen, rejected = parts["chosen"], parts["rejected"]
        else:
            prompt = _explicit_prompt(where, row)
        chosen = _answer(where, "chosen", chosen)
        rejected = _answer(where, "rejected", rejected)
    elif row.get("prompt") is not None or row.get("messages") is not None:
        prompt = _explicit_prompt(where, row)
        chosen, rejected = _answer(where, "chosen", chosen), _answer(where, "rejected", rejected)
    else:  # texts that share the prompt
        parts = extract_prompt({"chosen": chosen, "rejected": rejected})
        if not parts["prompt"].strip():
            raise SourceError(f"{where}: 'chosen' and 'rejected' share no prompt; add a 'prompt' column")
        prompt = [{"role": "user", "content": parts["prompt"]}]
        chosen, rejected = _answer(where, "chosen", parts["chosen"]), _answer(where, "rejected", parts["rejected"])
    return {"prompt_id": prompt_id(row, prompt), "messages": prompt, "chosen": chosen, "rejected": rejected}


def _explicit_prompt(where: str, row: dict) -> list[dict]:
    if row.get("prompt") is not None:
        return _check_prompt(where, "prompt", _turns(where, "prompt", row["prompt"]))
    if row.get("messages") is not None:
        return _check_prompt(where, "messages", messages(where, "messages", row["messages"]))
    raise SourceError(f"{where}: 'chosen' and 'rejected' hold only the answers, so a 'prompt' column is needed")


def ranked_pairs(where: str, row: dict) -> list[dict]:
    """A ranked row (`prompt` or `messages`, and `responses` best first) -> every ordered pair."""
    prompt = _explicit_prompt(where, row)
    responses = row["responses"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise SourceError(f"{where}, column 'responses': needs a list of >= 2 answers, best first")
    texts = [_answer(where, "responses", r) for r in responses]
    pid = prompt_id(row, prompt)
    return [{"prompt_id": pid, "messages": prompt, "chosen": texts[i], "rejected": texts[j]}
            for i in range(len(texts)) for j in range(i + 1, len(texts))]


def read(source: Source, kind: str) -> tuple[list[dict], dict]:
    """Every row of `source` converted for `kind` ("sft", "pairs", or "ranked": pairs plus ranked rows), and
    counts {"rows", "identical"}; pairs whose answers are identical are set aside and counted. Raises SourceError
    on the first bad row, naming it, and when nothing usable is left."""
    out: list[dict] = []
    counts = {"rows": 0, "identical": 0}
    for where, row in rows(source):
        counts["rows"] += 1
        if kind == "sft":
            out.append(sft_row(where, row))
            continue
        if kind == "ranked" and row.get("responses") is not None:
            converted = ranked_pairs(where, row)
        elif kind in ("pairs", "ranked"):
            converted = [pair_row(where, row)]
        else:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        for pair in converted:
            if pair["chosen"].strip() == pair["rejected"].strip():
                counts["identical"] += 1
            else:
                out.append(pair)
    if not out:
        same = f", {counts['identical']} with identical answers" if counts["identical"] else ""
        raise SourceError(f"{source}: no usable rows ({counts['rows']} read{same})")
    return out, counts


def weighted(rows_: list[dict], weight: float, seed: int | str) -> list[dict]:
    """`weight` x the rows: whole copies for the integer part, a seeded draw without replacement for the rest."""
    whole, part = divmod(weight, 1.0)
    extra = round(part * len(rows_))
    picked = sorted(random.Random(f"{seed}").sample(range(len(rows_)), extra)) if extra else []
    return rows_ * int(whole) + [rows_[i] for i in picked]


def mix(sources: list[Source], kind: str, seed: int) -> tuple[list[dict], dict]:
    """The rows of every source with its weight applied, in source order, and per-source counts for the
    manifest: {key: {"path", "rows", "identical", "used", "weight"}}."""
    out, report = [], {}
    for i, source in enumerate(sources):
        got, counts = read(source, kind)
        used = weighted(got, source.weight, f"{seed}:{i}")
        if not used:
            raise SourceError(f"{source}: weight {source.weight} of {len(got)} rows leaves none")
        out += used
        report[source.key or source.path] = {"path": source.path, "weight": source.weight, **counts,
                                             "used": len(used)}
    return out, report


def save(rows_: list[dict], folder: Path) -> None:
    """Rows as a `datasets` folder (the format of posttrain's own stage outputs)."""
    import datasets

    datasets.Dataset.from_list(rows_).save_to_disk(str(folder))
