"""Teacher log-probs for token-level distillation (`generate.teacher_logprobs: k`).

With `Sampling.top_logprobs = k` a backend adds to each sample, beside its text:
- `completion_ids`: the generated token ids, end-of-turn token excluded (they decode to `text`);
- `topk_ids` / `topk_logprobs`: per generated token (the end-of-turn token included when the sample stopped on
  one and the backend reports it), the teacher's k most likely next tokens and their log-probs, from the raw
  log-softmax (temperature 1, whatever temperature sampled the text), highest first.

The generate stage stores them beside the text as int32 ids and float16 log-probs (`kd_features`): about
6k bytes per generated token plus the list offsets (k = 20: ~130 bytes). float16 keeps a log-prob to about 5e-4 of
its value (a relative error; -10.0 is kept to within 0.005).

`TokenIds` maps what an OpenAI-compatible server returns (token strings and their UTF-8 `bytes`, or vLLM's
`token_id:N` with `return_tokens_as_token_ids`) back to ids of a local tokenizer; `check_spelling` proves the ids
spell the returned text, which is the vocabulary check for a teacher whose tokenizer is not on this machine.
"""

from __future__ import annotations

from posttrain.train.kd import KD_COLUMNS  # noqa: F401 - the columns' names, shared with the SFT stage


def kd_features() -> dict:
    """The `datasets` features of the KD columns: int32 ids, float16 log-probs."""
    import datasets

    return {
        "completion_ids": datasets.Sequence(datasets.Value("int32")),
        "topk_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "topk_logprobs": datasets.Sequence(datasets.Sequence(datasets.Value("float16"))),
    }


class VocabularyMismatch(ValueError):
    """The teacher's tokens are not the student's: token-level distillation cannot use them."""


SEQUENCE_LEVEL_HINT = ("token-level distillation needs a teacher and a student that share one vocabulary; use "
                       "sequence-level distillation instead (generate.teacher_logprobs=0, sft.kd.weight=0): the "
                       "student then learns from the teacher's text alone")


def sample_fields(body: list[int], top_ids, top_logprobs, stopped: int | None, chosen=None) -> dict:
    """A sample's KD fields from its generated ids (`body`, end-of-turn token excluded) and the per-step top-k
    arrays of every step it took (one more than `body` when it `stopped` on an end-of-turn token: that token's id).
    `chosen`: the log-prob of the token taken at each step. Those two are kept as `stop_token_id` and
    `token_logprobs` (what a server reports; the generate stage does not store them)."""
    steps = len(body) + (1 if stopped is not None else 0)
    return {"completion_ids": [int(t) for t in body],
            "topk_ids": [[int(t) for t in row] for row in top_ids[:steps]],
            "topk_logprobs": [[float(v) for v in row] for row in top_logprobs[:steps]],
            "stop_token_id": stopped,
            **({"token_logprobs": [float(v) for v in chosen[:steps]]} if chosen is not None else {})}


def same_vocabulary(teacher_tokenizer, student_tokenizer) -> str | None:
    """None when both tokenizers map every token to the same id, else what differs (a count and an example)."""
    a, b = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if a == b:
        return None
    only_a = sorted(set(a) - set(b), key=a.get)
    only_b = sorted(set(b) - set(a), key=b.get)
    moved = sorted((t for t in set(a) & set(b) if a[t] != b[t]), key=a.get)
    parts = [f"the teacher has {len(a)} tokens, the student {len(b)}"]
    if only_a:
        parts.append(f"{len(only_a)} only in the teacher's (e.g. {only_a[0]!r})")
    if only_b:
        parts.append(f"{len(only_b)} only in the student's (e.g. {only_b[0]!r})")
    if moved:
        parts.append(f"{len(moved)} with other ids (e.g. {moved[0]!r}: {a[moved[0]]} vs {b[moved[0]]})")
    return "; ".join(parts)


REPLACEMENT = "\ufffd".encode()


class TokenIds:
    """Token ids of a local byte-level BPE tokenizer (Llama 3, SmolLM2, GPT-2 families) for the tokens an
    OpenAI-compatible server reports: by `token_id:N` when the server sends ids (vLLM's
    `return_tokens_as_token_ids`), else by the token's UTF-8 bytes. A tokenizer that is not byte-level cannot be
    read by bytes: VocabularyMismatch."""

    def __init__(self, tokenizer):
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        to_byte = {c: b for b, c in bytes_to_unicode().items()}
        special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()}
        self.bytes_of: dict[int, bytes] = {}  # each token's UTF-8 bytes (a special token: its text's)
        self.by_bytes: dict[bytes, int] = {}
        unreadable = 0
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
            if i in special:
                raw = token.encode()
            elif all(c in to_byte for c in token):
                raw = bytes(to_byte[c] for c in token)
            else:
                unreadable += 1
                continue
            self.bytes_of[i] = raw
            self.by_bytes.setdefault(raw, i)  # the lowest id wins where two tokens spell the same bytes
        if unreadable > len(self.by_bytes):
            raise VocabularyMismatch(f"{type(tokenizer).__name__} is not a byte-level BPE tokenizer, so a server's "
                                     f"tokens cannot be mapped back to its ids by their bytes; serve with vLLM's "
                                     f"return_tokens_as_token_ids (extra_body) or {SEQUENCE_LEVEL_HINT}")

    def entry(self, token_id: int, logprob: float, as_id: bool = False) -> dict:
        """How an OpenAI-compatible server reports one token: its text, log-prob and bytes (vLLM with
        `return_tokens_as_token_ids`: `token_id:N`)."""
        raw = self.bytes_of.get(token_id, b"")
        return {"token": f"token_id:{token_id}" if as_id else raw.decode("utf-8", "replace"),
                "logprob": logprob, "bytes": list(raw)}

    def id_of(self, entry: dict) -> int:
        """The id of one `logprobs.content[i]` or `top_logprobs[j]` entry."""
        token = entry.get("token") or ""
        if token.startswith("token_id:"):
            return int(token.removeprefix("token_id:"))
        raw = bytes(entry["bytes"]) if entry.get("bytes") is not None else token.encode()
        if raw == REPLACEMENT and token == "\ufffd":
            raise VocabularyMismatch("the server returned a token as U+FFFD, the replacement character (vLLM does so "
                                     "for a token that is part of a UTF-8 character), so its bytes and id are lost; "
                                     "serve with vLLM's return_tokens_as_token_ids (generate.backend.extra_body: "
                                     "{return_tokens_as_token_ids: true}), which sends ids")
        if raw not in self.by_bytes:
            raise VocabularyMismatch(f"the server returned a token {token!r} (bytes {raw!r}) that is not one token of "
                                     f"the local tokenizer; {SEQUENCE_LEVEL_HINT}")
        return self.by_bytes[raw]

    def read(self, content: list[dict], k: int, text: str, stop_ids) -> dict:
        """A choice's `logprobs.content` -> the sample's KD fields, checked to spell `text` (`check_spelling`)."""
        ids = [self.id_of(e) for e in content]
        tops = [[(self.id_of(t), float(t["logprob"])) for t in e.get("top_logprobs") or []] for e in content]
        if any(len(row) < k for row in tops):
            short = min(len(row) for row in tops)
            raise ValueError(f"the server returned {short} top_logprobs for a token, {k} asked for (the server's "
                             f"max_logprobs may be lower; vLLM: --max-logprobs)")
        tops = [sorted(row, key=lambda t: -t[1])[:k] for row in tops]
        body = ids[:-1] if ids and ids[-1] in stop_ids else ids
        check_spelling(self.tokenizer, body, text)
        return {"completion_ids": body, "topk_ids": [[i for i, _ in row] for row in tops],
                "topk_logprobs": [[v for _, v in row] for row in tops]}


def check_spelling(tokenizer, ids: list[int], text: str) -> None:
    """The ids decode (special tokens skipped) to `text`, else VocabularyMismatch."""
    spelled = tokenizer.decode(ids, skip_special_tokens=True)
    if spelled != text:
        at = next((i for i, (a, b) in enumerate(zip(spelled, text)) if a != b), min(len(spelled), len(text)))
        raise VocabularyMismatch(f"the teacher's tokens, read as the student's ids, spell {spelled[at:at + 40]!r} "
                                 f"where the teacher wrote {text[at:at + 40]!r} (character {at}); "
                                 f"{SEQUENCE_LEVEL_HINT}")
