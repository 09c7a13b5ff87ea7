"""The `openai` generation backend: any OpenAI-compatible `/v1/chat/completions` server (vLLM serve, SGLang,
TGI, hosted APIs), for teachers too large to run in-process (a 405B teacher served elsewhere).

One request per prompt asks for all `n` samples at once (and again for the rest when a server returns fewer).
Requests run on `max_concurrency` threads, spread over several base URLs (least busy healthy one first: an
endpoint that fails is left alone for a backoff that doubles with each consecutive failure), and are retried with
exponential backoff and jitter on 429, 5xx, timeouts, dropped connections and malformed or empty replies,
honouring Retry-After. A prompt the server rejects for itself (400, 413, 422: too long, filtered) is reported in
`PromptsRejected` after the others finish, for the stage to quarantine; most prompts rejected means a
misconfigured request, and fails. Paid work is not thrown away: with `journal_dir`, each reply's completions are
appended (fsync'd) to a JSONL journal the moment they arrive (a partial reply too), and a rerun answers journaled
prompts from it instead of sending them again. The journal is keyed by what is asked (model, messages, sampling),
not by where: base URLs, keys, retries, timeouts and concurrency can change between runs (`unhashed`).

The API key is read from the environment variable `api_key_env` on each `generate` call and goes only into the
Authorization header: it is never an attribute, never in the journal, never in an error message.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_gen.backend import PromptsRejected, Sampling

JOURNAL_NAME = "openai_journal.jsonl"
_RETRY_STATUS = {408, 409, 425, 429} | set(range(500, 600))
_MAX_SLEEP = 60.0
_FINISH = {"stop": "stop", "eos": "stop", "eos_token": "stop", "end_turn": "stop", "length": "length",
           "max_tokens": "length"}


class RequestFailed(RuntimeError):
    """A prompt's request failed for good (a non-retryable status, or retries used up)."""


class Rejected(RequestFailed):
    """The server refused this prompt itself (400, 413, 422): sending it again will not help."""


_REJECTED_STATUS = {400, 413, 422}


class OpenAIBackend:
    """Chat completions from OpenAI-compatible servers. `model` is the name the server knows the model by
    (`served_model` overrides it, e.g. when the recipe's model spec is a local path but the server was started
    with `--served-model-name`). `base_urls` are one or more roots such as `http://host:8000/v1` (a bare
    `http://host:8000` gets `/v1`). `api_key_env` names the environment variable holding the key (None for
    servers that need none). `timeout` is seconds to wait for a reply on top of `max_tokens / min_tokens_per_s`
    (a non-streamed reply arrives whole, after the server generated all of it: a 2048-token answer at 20
    tokens/s is 100 s of silence that is not a failure); `max_retries` is retries per request after the first
    attempt; `backoff` the first retry's base delay in seconds (doubling each time).
    `journal_dir` holds the per-prompt journal; `extra_body` is merged into every request body (e.g.
    `{"top_k": 20}` for vLLM). `tokenizer`: a local tokenizer of the served model's vocabulary (the student's, for
    token-level distillation), needed for `Sampling.top_logprobs`: the reply's tokens are mapped back to its ids and
    must spell the reply's text (data_gen/logprobs.py)."""

    # The model is a name the server knows, not a local spec (validation does not look for it on disk).
    remote = True
    # Where and how to reach the servers, not what they compute: left out of the stage's hash, so a rerun with
    # other URLs, keys, retries or concurrency keeps its finished shards and journal.
    default_shard_size = 256  # prompts per generate shard unless the recipe says (generate.shard_size)
    unhashed = ("base_urls", "api_key_env", "max_concurrency", "timeout", "max_retries", "backoff",
                "min_tokens_per_s")

    def __init__(
        self,
        model: str,
        base_urls: list[str] | str,
        api_key_env: str | None = "OPENAI_API_KEY",
        max_concurrency: int = 16,
        timeout: float = 120,
        max_retries: int = 6,
        backoff: float = 1.0,
        journal_dir: str | None = None,
        extra_body: dict | None = None,
        served_model: str | None = None,
        min_tokens_per_s: float = 10.0,
        tokenizer: str | None = None,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("OpenAIBackend: base_urls is empty; give at least one server, e.g. http://host:8000/v1")
        self.model = served_model or model
        self.endpoints = list(dict.fromkeys(_endpoint(u) for u in urls))  # a URL listed twice is one endpoint
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.timeout = timeout
        self.max_retries = max(0, int(max_retries))
        self.backoff = backoff
        self.journal_path = Path(journal_dir) / JOURNAL_NAME if journal_dir else None
        self.extra_body = dict(extra_body or {})
        self.min_tokens_per_s = float(min_tokens_per_s)
        self.tokenizer = tokenizer
        self._token_ids = None  # data_gen.logprobs.TokenIds, built on the first call that asks for log-probs
        self.requests_sent = 0  # HTTP attempts, retries included
        self.prompts_sent = 0  # prompts that needed the server (not answered from the journal)
        self.prompts_from_journal = 0
        self.retries = 0
        self._lock = threading.Lock()
        self._busy = [0] * len(self.endpoints)
        self._failures = [0] * len(self.endpoints)  # consecutive failures per endpoint
        self._resting_until = [0.0] * len(self.endpoints)  # monotonic time before which a failing one is avoided
        self._next = 0  # round-robin among equally busy endpoints
        # What the journal holds: key -> (samples, byte offset of their line), read on first use; the samples are
        # read back from the file when asked for, so a large journal (teacher log-probs) is not held in memory.
        # Without a journal file: key -> the samples themselves.
        self._done: dict[str, tuple[int, int] | list[dict]] | None = None

    def __repr__(self) -> str:
        return (f"OpenAIBackend(model={self.model!r}, base_urls={self.endpoints}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    def stats(self) -> dict:
        """Counters since construction, for the stage's manifest entry."""
        return {"requests_sent": self.requests_sent, "prompts_sent": self.prompts_sent,
                "prompts_from_journal": self.prompts_from_journal, "retries": self.retries}

    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[dict]]:
        """`n` completions for each chat prompt, as dicts with text, prompt_tokens, completion_tokens,
        finish_reason ("stop", "length", or the server's own word such as "content_filter") and model (the name
        the server answered with). Prompt i is sent with a seed derived from (sampling.seed, i), so a rerun asks
        for the same samples. If some prompts fail for good, the others still finish (and are journaled) before
        PromptsRejected (only prompts the server refused for themselves) or RequestFailed is raised."""
        if sampling.top_logprobs and self._token_ids is None:
            self._token_ids = self._load_token_ids()
        bodies = [self._body(messages, n, sampling, i) for i, messages in enumerate(prompts)]
        keys = [hashlib.sha256(json.dumps(b, sort_keys=True).encode()).hexdigest() for b in bodies]
        if self._done is None:
            self._done = self._read_journal()
        results: list[list[dict] | None] = [self._journaled(k) if self._count(k) >= n else None for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        with self._lock:
            self.prompts_from_journal += len(prompts) - len(todo)
        if not todo:
            return results
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise RuntimeError(f"OpenAIBackend: the environment variable {self.api_key_env!r} (api_key_env) is "
                                   f"not set; export it with the API key, or set api_key_env: null for a server "
                                   f"that needs no key")
            headers["Authorization"] = f"Bearer {key}"
        stop = threading.Event()  # after a failure that is not one prompt's: start nothing new, let the rest finish
        errors: list[str] = []
        rejected: dict[int, str] = {}

        def run(i: int) -> None:
            if stop.is_set():
                return
            try:
                results[i] = self._complete(bodies[i], keys[i], headers, sampling.max_new_tokens)
            except Rejected as err:
                rejected[i] = str(err)
            except Exception as err:  # noqa: BLE001 - reported below, after the other prompts finish
                stop.set()
                errors.append(f"prompt {i}: {err}" if isinstance(err, RequestFailed) else
                              f"prompt {i}: {type(err).__name__}: {err}")

        with self._lock:
            self.prompts_sent += len(todo)
        with ThreadPoolExecutor(min(self.max_concurrency, len(todo)), thread_name_prefix="openai") as pool:
            list(pool.map(run, todo))
        if errors:
            left = sum(r is None for r in results)
            raise RequestFailed(f"{left} of {len(prompts)} prompts unanswered; {errors[0]}"
                                + (f" (and {len(errors) - 1} more failures)" if len(errors) > 1 else ""))
        if rejected:
            if len(rejected) > max(2, len(prompts) // 2):  # not the prompts: the request itself is wrong
                first = min(rejected)
                raise RequestFailed(f"{len(rejected)} of {len(prompts)} prompts rejected, which points at the request "
                                    f"rather than the prompts (model name, extra_body?); prompt {first}: "
                                    f"{rejected[first]}")
            raise PromptsRejected(results, rejected)
        return results

    def _body(self, messages: list[dict], n: int, sampling: Sampling, i: int) -> dict:
        seed = int(hashlib.sha256(f"{sampling.seed}:{i}".encode()).hexdigest()[:8], 16) % (2**31)
        logprobs = {"logprobs": True, "top_logprobs": sampling.top_logprobs} if sampling.top_logprobs else {}
        return {"model": self.model, "messages": messages, "n": n, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_new_tokens, "seed": seed, **logprobs,
                **self.extra_body}

    def _load_token_ids(self):
        from data_gen.logprobs import TokenIds
        from posttrain.chat import end_of_turn_ids
        from posttrain.models import load_tokenizer

        if not self.tokenizer:
            raise ValueError("OpenAIBackend: top_logprobs (generate.teacher_logprobs) needs `tokenizer`, a local "
                             "tokenizer of the served model's vocabulary (the student's model.path), to map the "
                             "reply's tokens to ids")
        tokenizer = load_tokenizer(self.tokenizer)
        self._stop_ids = set(end_of_turn_ids(tokenizer))
        return TokenIds(tokenizer)

    def _read_logprobs(self, samples: list[dict], k: int) -> list[dict]:
        """Each sample's reply `logprobs` -> its KD fields (data_gen/logprobs.py), checked to spell its text."""
        out = []
        for s in samples:
            content = s.pop("_logprobs", None)
            if content is None:
                raise RequestFailed(f"{self.model}: the server answered without logprobs although they were asked "
                                    f"for (logprobs: true, top_logprobs: {k}); it does not support them")
            out.append(s | self._token_ids.read(content, k, s["text"], self._stop_ids))
            out[-1]["completion_tokens"] = len(out[-1]["completion_ids"])
        return out

    def _complete(self, body: dict, key: str, headers: dict, max_tokens: int) -> list[dict]:
        """All `body["n"]` samples of one prompt, starting from those journaled earlier; asks again for the rest
        when a server returns fewer choices, journaling each part as it arrives."""
        samples: list[dict] = list(self._journaled(key))
        while len(samples) < body["n"]:
            part = dict(body, n=body["n"] - len(samples), seed=(body["seed"] + len(samples)) % 2**31)
            got = self._post(part, headers, max_tokens)[: part["n"]]
            samples += self._read_logprobs(got, body["top_logprobs"]) if body.get("logprobs") else got
            self._journal(key, samples)
        return samples

    def _post(self, body: dict, headers: dict, max_tokens: int) -> list[dict]:
        """The samples of one chat completion, retried on 429/5xx/timeouts/connection errors and malformed or
        empty replies; another endpoint each retry, a failing endpoint rested."""
        data = json.dumps(body).encode()
        # Seconds without a byte: a non-streamed reply comes whole once the server has generated all of it.
        timeout = self.timeout + body["max_tokens"] / max(self.min_tokens_per_s, 1e-3)  # n samples decode together
        avoid = None
        for attempt in range(self.max_retries + 1):
            url = self._acquire(avoid)
            wait, ok = None, False
            try:
                with self._lock:
                    self.requests_sent += 1
                req = urllib.request.Request(url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    raw = resp.read()
                try:
                    got = _samples(json.loads(raw), max_tokens)
                except (ValueError, TypeError, AttributeError, KeyError) as err:
                    raise _Malformed(f"{err}; body: {raw[:300].decode('utf-8', 'replace')!r}") from None
                if not got:
                    raise _Malformed(f"no choices; body: {raw[:300].decode('utf-8', 'replace')!r}")
                ok = True
                return got
            except urllib.error.HTTPError as err:
                try:
                    detail = err.read()[:300].decode("utf-8", "replace")
                except (OSError, http.client.HTTPException):
                    detail = ""
                problem = f"HTTP {err.code} from {url}: {detail}"
                if err.code in _REJECTED_STATUS:
                    ok = True  # the endpoint works; this prompt is the problem
                    raise Rejected(problem) from None
                if err.code not in _RETRY_STATUS:
                    hint = f" (check {self.api_key_env})" if err.code in (401, 403) and self.api_key_env else ""
                    raise RequestFailed(problem + hint) from None
                wait = _retry_after(err.headers.get("Retry-After"))
            except _Malformed as err:
                problem = f"a malformed reply from {url}: {err}"
            except (OSError, http.client.HTTPException, ValueError) as err:  # refused, reset, timeout
                reason = getattr(err, "reason", err)
                problem = f"{type(reason).__name__} from {url}: {reason}"
            finally:
                self._release(url, ok)
            avoid = url
            if attempt == self.max_retries:
                break
            with self._lock:
                self.retries += 1
            if wait is None:
                wait = self.backoff * 2**attempt * random.uniform(0.5, 1.5)
            time.sleep(min(wait, _MAX_SLEEP))
        raise RequestFailed(f"gave up after {self.max_retries + 1} attempts; last: {problem}")

    def _acquire(self, avoid: str | None) -> str:
        """The endpoint for the next attempt: among those not resting (all, if every one is), not the one that
        just failed, the least busy; ties go round-robin."""
        with self._lock:
            now = time.monotonic()
            order = [(self._next + j) % len(self.endpoints) for j in range(len(self.endpoints))]
            awake = [j for j in order if self._resting_until[j] <= now]
            if awake:
                order = awake
            else:  # all resting: the one that wakes first
                order = [min(order, key=lambda j: self._resting_until[j])]
            if avoid is not None and len(order) > 1:
                order = [j for j in order if self.endpoints[j] != avoid]
            j = min(order, key=lambda j: self._busy[j])  # min keeps the first of ties: round-robin
            self._busy[j] += 1
            self._next = (j + 1) % len(self.endpoints)
            return self.endpoints[j]

    def _release(self, url: str, ok: bool) -> None:
        with self._lock:
            j = self.endpoints.index(url)
            self._busy[j] -= 1
            if ok:
                self._failures[j] = 0
                self._resting_until[j] = 0.0
            else:
                self._failures[j] += 1
                rest = min(self.backoff * 2 ** min(self._failures[j] - 1, 16), _MAX_SLEEP)
                self._resting_until[j] = time.monotonic() + rest

    def endpoint_failures(self) -> dict[str, int]:
        """Consecutive failures per endpoint now (0: healthy)."""
        with self._lock:
            return dict(zip(self.endpoints, self._failures))

    def _read_journal(self) -> dict[str, tuple[int, int]]:
        """key -> (number of samples, offset of the line) of each prompt's latest, longest journal entry."""
        if self.journal_path is None or not self.journal_path.exists():
            return {}
        done: dict[str, tuple[int, int]] = {}
        offset = 0
        with open(self.journal_path, "rb") as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    if len(entry["samples"]) >= done.get(entry["key"], (0, 0))[0]:  # a later, longer part
                        done[entry["key"]] = (len(entry["samples"]), offset)
                except (ValueError, KeyError, TypeError):  # a line cut short by a crash: that prompt is redone
                    pass
                offset += len(line)
        return done

    def _count(self, key: str) -> int:
        entry = (self._done or {}).get(key)
        return 0 if entry is None else len(entry) if self.journal_path is None else entry[0]

    def _journaled(self, key: str) -> list[dict]:
        """The samples journaled for `key` ([] when none), read back from their line of the journal."""
        entry = (self._done or {}).get(key)
        if entry is None:
            return []
        if self.journal_path is None:
            return entry
        with open(self.journal_path, "rb") as f:
            f.seek(entry[1])
            return json.loads(f.readline())["samples"]

    def _journal(self, key: str, samples: list[dict]) -> None:
        if self.journal_path is None:
            with self._lock:
                self._done[key] = samples
            return
        line = json.dumps({"key": key, "samples": samples}) + "\n"
        with self._lock:
            self.journal_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.journal_path, "a+b") as f:
                if f.seek(0, os.SEEK_END):
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")  # end a line torn by a crash, so it does not swallow this entry
                offset = f.seek(0, os.SEEK_END)
                f.write(line.encode())
                f.flush()
                os.fsync(f.fileno())
            self._done[key] = (len(samples), offset)


class _Malformed(ValueError):
    """A 200 reply that is not a chat completion with choices."""


def _endpoint(base_url: str) -> str:
    base = base_url.rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"OpenAIBackend: base URL {base_url!r} is not an http(s) URL such as http://host:8000/v1")
    if "@" in parts.netloc:  # credentials in a URL end up in logs and configs
        raise ValueError("OpenAIBackend: base URLs must not carry credentials; name the key's environment "
                         "variable in api_key_env instead")
    return base + ("/v1" if parts.path in ("", "/") else "") + "/chat/completions"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # the other form: an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _samples(response: dict, max_tokens: int) -> list[dict]:
    """A chat.completion response -> our sample dicts. The API reports completion tokens for all choices
    together: choices cut at the limit used exactly `max_tokens`; the rest of the total is split among the
    others in proportion to their text length (exact when there is one such choice)."""
    choices = sorted(response.get("choices") or [], key=lambda c: c.get("index", 0))
    usage = response.get("usage") or {}
    served = str(response.get("model") or "")
    out = [{"text": (c.get("message") or {}).get("content") or "",
            "prompt_tokens": int(usage.get("prompt_tokens") or 0),
            "completion_tokens": 0,
            "finish_reason": _FINISH.get(c.get("finish_reason"), str(c.get("finish_reason"))),
            **({"model": served} if served else {}),
            **({"_logprobs": c["logprobs"]["content"]} if (c.get("logprobs") or {}).get("content") is not None
               else {})} for c in choices]
    cut = [s for s in out if s["finish_reason"] == "length"]
    rest = [s for s in out if s["finish_reason"] != "length"]
    for s in cut:
        s["completion_tokens"] = max_tokens
    total = max(0, int(usage.get("completion_tokens") or 0) - max_tokens * len(cut))
    chars = sum(len(s["text"]) for s in rest)
    left = total
    for j, s in enumerate(rest):
        share = total * len(s["text"]) / chars if chars else total / len(rest)
        s["completion_tokens"] = left if j == len(rest) - 1 else min(left, round(share))
        left -= s["completion_tokens"]
    return out
