"""Prompt sources: JSONL files and `datasets` folders, validated row by row, sampled per round.

A row holds either `messages` (a list of {"role", "content"} ending with a non-assistant turn) or `prompt`
(a string, turned into one user message), and optionally `id` (otherwise a hash of the messages). Any other
fields (a reference `answer`, `constraints`, unit `tests`...) travel with the prompt as its `meta`, for rewards.
A malformed row is an error naming the file and line (JSONL) or row (dataset). An empty prompt is an error,
or, with `on_empty="quarantine"`, set aside and counted.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import PosttrainError
from posttrain.models import resolve_path

ROLES = ("system", "user", "assistant", "ipython", "tool")


class PromptError(PosttrainError):
    pass


@dataclass
class PromptSet:
    prompts: list[dict]  # {"prompt_id": str, "messages": [...], "meta": {other fields of the row}}
    quarantined: list[dict] = field(default_factory=list)  # {"where": "file:line", "reason": str, "row": ...}


def _rows(path: Path, split: str):
    """Yield (where, row) pairs; `where` names the file and line or row for error messages."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the path named
            raise PromptError(f"{path}: not a dataset saved with save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise PromptError(f"{path}: no split '{split}' (has {sorted(ds)}); set data.split")
            ds = ds[split]
        for i, row in enumerate(ds):
            yield f"{path} row {i}", row
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # a byte-order mark some editors write: not part of the row
            try:
                line = raw.decode("utf-8")  # CRLF line ends are whitespace to the JSON parser
            except UnicodeDecodeError as e:
                raise PromptError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                  f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise PromptError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}:{lineno}", row


def _messages(where: str, row: dict) -> list[dict]:
    if row.get("messages") is not None:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise PromptError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise PromptError(
                    f"{where}: messages[{j}] must be an object with 'role' in {ROLES} and a string 'content'"
                )
        if msgs[-1]["role"] == "assistant":
            raise PromptError(f"{where}: the last message is the assistant's; a prompt ends before the answer")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if row.get("prompt") is not None:
        if not isinstance(row["prompt"], str):
            raise PromptError(f"{where}: 'prompt' must be a string")
        return [{"role": "user", "content": row["prompt"]}]
    raise PromptError(f"{where}: needs a 'messages' or a 'prompt' field (has {sorted(row)})")


def load_prompts(path: str, on_empty: str = "error", split: str = "train") -> PromptSet:
    """Read and validate every row of a prompt source. Returns the valid prompts, in file order, and the
    quarantined rows. Raises PromptError naming the file and line/row for malformed input."""
    if on_empty not in ("error", "quarantine"):
        raise PromptError(f"data.on_empty must be 'error' or 'quarantine', not {on_empty!r}")
    try:
        p = resolve_path(path)
    except ValueError as e:
        raise PromptError(str(e)) from None
    if not p.exists():
        raise PromptError(f"prompt source {path} does not exist")
    out = PromptSet(prompts=[])
    seen: dict[str, str] = {}
    for where, row in _rows(p, split):
        msgs = _messages(where, row)
        if not any(m["content"].strip() for m in msgs if m["role"] != "system"):
            if on_empty == "error":
                raise PromptError(f"{where}: empty prompt (set data.on_empty=quarantine to set such rows aside)")
            out.quarantined.append({"where": where, "reason": "empty prompt", "row": row})
            continue
        pid = str(row["id"]) if row.get("id") is not None else hashlib.sha256(
            json.dumps(msgs, sort_keys=True).encode()
        ).hexdigest()[:12]
        if pid in seen:
            raise PromptError(f"{where}: prompt id {pid!r} already used at {seen[pid]}")
        seen[pid] = where
        meta = {k: v for k, v in row.items() if k not in ("id", "prompt", "messages")}
        out.prompts.append({"prompt_id": pid, "messages": msgs, "meta": meta})
    if not out.prompts:
        raise PromptError(f"{path}: no usable prompts")
    return out


def sample_round(prompts: list[dict], n: int, start: int, seed: int) -> list[dict]:
    """`n` distinct prompts read from position `start` of a stream made of seeded permutations of the pool, one
    after another. Rounds read consecutive stretches (round r starts where round r-1 ended), so they get
    disjoint prompts until the pool runs out. A round takes at most the whole pool and never a prompt twice:
    where its stretch crosses into the next permutation, prompts it already has are skipped."""
    n = min(n, len(prompts))
    out: list[dict] = []
    taken: set[str] = set()
    pos = start
    while len(out) < n:
        epoch, offset = divmod(pos, len(prompts))
        order = list(range(len(prompts)))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        p = prompts[order[offset]]
        if p["prompt_id"] not in taken:
            taken.add(p["prompt_id"])
            out.append(p)
        pos += 1
    return out
