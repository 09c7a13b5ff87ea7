"""The `openai` backend against 127.0.0.1 servers the tests start: the reference server over the tiny model
(a subprocess) and scripted in-process servers for retries and load balancing. Every request count and wait is
bounded."""

import dataclasses
import json
import os
import select
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_gen.backend import PromptsRejected, Sampling
from data_gen.hf_backend import HFBackend
from data_gen.openai_backend import JOURNAL_NAME, OpenAIBackend, RequestFailed

TINY = "tiny://layers=2,hidden=64,seed=0"
KEY_ENV = "POSTTRAIN_TEST_OPENAI_KEY"
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [[{"role": "user", "content": f"Question number {i}: say something."}] for i in range(12)]


# --- the reference server, as a subprocess ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_key():
    key = f"sk-posttrain-{uuid.uuid4().hex}"
    os.environ[KEY_ENV] = key  # the server subprocesses inherit it; the backend reads it per call
    yield key
    os.environ.pop(KEY_ENV, None)


def start_server(log: Path, port: int = 0, delay: float = 0.0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "data_gen.openai_server", "--model", TINY, "--port", str(port),
         "--api-key-env", KEY_ENV, "--delay", str(delay)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=open(log, "a"), text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening on"):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{log.read_text()[-2000:]}")
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=10)


def served(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
        return json.loads(r.read())["chat_requests"]


@pytest.fixture(scope="module")
def server(api_key, tmp_path_factory):
    proc, port = start_server(tmp_path_factory.mktemp("server") / "server.log")
    yield port
    stop(proc)


def test_n_completions_match_the_model_with_the_seed_sent(server):
    backend = OpenAIBackend(TINY, f"http://127.0.0.1:{server}/v1", api_key_env=KEY_ENV, max_concurrency=3)
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)
    out = backend.generate(PROMPTS[:3], n=3, sampling=sampling)
    assert [len(s) for s in out] == [3, 3, 3]
    assert backend.stats() == {"requests_sent": 3, "prompts_sent": 3, "prompts_from_journal": 0, "retries": 0}
    # What the model itself gives for the seed the backend derived for each prompt: same texts, same counts.
    hf = HFBackend(TINY)
    for i, samples in enumerate(out):
        seed = backend._body(PROMPTS[i], 3, sampling, i)["seed"]
        want = hf.generate([PROMPTS[i]], 3, Sampling(1.0, 0.9, 8, seed))[0]
        assert [s["text"] for s in samples] == [w["text"] for w in want]
        assert [s["finish_reason"] for s in samples] == [w["finish_reason"] for w in want]
        assert {s["prompt_tokens"] for s in samples} == {want[0]["prompt_tokens"]}
        # The API reports one total for all choices; the backend splits it, exactly for choices cut at the limit.
        assert sum(s["completion_tokens"] for s in samples) == sum(w["completion_tokens"] for w in want)
        assert all(s["completion_tokens"] == 8 for s in samples if s["finish_reason"] == "length")
    # One sample per prompt: counts are exact.
    one = backend.generate(PROMPTS[3:4], n=1, sampling=Sampling(max_new_tokens=6, seed=2))
    seed = backend._body(PROMPTS[3], 1, Sampling(max_new_tokens=6, seed=2), 0)["seed"]
    assert one[0] == [{**s, "model": TINY} for s in hf.generate(PROMPTS[3:4], 1, Sampling(max_new_tokens=6,
                                                                                        seed=seed))[0]]
    # Rows record the name the server answered with (the reference server answers with the model it serves).


def test_key_problems_fail_at_once_naming_the_variable(server, monkeypatch):
    backend = OpenAIBackend(TINY, f"http://127.0.0.1:{server}", api_key_env="POSTTRAIN_TEST_NO_SUCH_KEY")
    with pytest.raises(RuntimeError, match="POSTTRAIN_TEST_NO_SUCH_KEY"):
        backend.generate(PROMPTS[:1], 1, Sampling(max_new_tokens=2))
    assert backend.requests_sent == 0
    monkeypatch.setenv("POSTTRAIN_TEST_WRONG_KEY", "sk-wrong")
    backend = OpenAIBackend(TINY, f"http://127.0.0.1:{server}", api_key_env="POSTTRAIN_TEST_WRONG_KEY")
    with pytest.raises(RequestFailed, match="HTTP 401.*POSTTRAIN_TEST_WRONG_KEY"):
        backend.generate(PROMPTS[:1], 1, Sampling(max_new_tokens=2))
    assert backend.requests_sent == 1 and backend.retries == 0  # a bad key is not retried
    with pytest.raises(ValueError, match="credentials"):
        OpenAIBackend(TINY, f"http://user:sk-inline@127.0.0.1:{server}/v1")


def test_killed_server_rerun_sends_only_unfinished_prompts_and_no_key_is_written(api_key, tmp_path):
    """The issue's scenario: the server dies mid-run; after a restart the rerun sends only the prompts the
    journal lacks, and ends with what an uninterrupted run gives. The key appears in no file and no repr."""
    journal = tmp_path / "partial" / "openai"
    log = tmp_path / "server.log"
    sampling = Sampling(max_new_tokens=6, seed=11)
    proc, port = start_server(log, delay=0.25)
    url = f"http://127.0.0.1:{port}/v1"

    finished = threading.Event()

    def kill_after_three():
        deadline = time.time() + 60
        while time.time() < deadline and not finished.is_set():
            if (journal / JOURNAL_NAME).exists() and len((journal / JOURNAL_NAME).read_text().splitlines()) >= 3:
                proc.kill()
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_three)
    killer.start()
    first = OpenAIBackend(TINY, url, api_key_env=KEY_ENV, max_concurrency=2, max_retries=2, backoff=0.05,
                          timeout=10, journal_dir=str(journal))
    try:
        with pytest.raises(RequestFailed, match="unanswered"):
            first.generate(PROMPTS, n=2, sampling=sampling)
    finally:
        finished.set()
        killer.join()
        proc.kill()
    proc.wait(timeout=10)
    journaled = len((journal / JOURNAL_NAME).read_text().splitlines())
    assert 3 <= journaled < len(PROMPTS)

    proc, port = start_server(log, port=port)  # same address, as a restarted server would have
    try:
        again = OpenAIBackend(TINY, url, api_key_env=KEY_ENV, max_concurrency=2, journal_dir=str(journal))
        resumed = again.generate(PROMPTS, n=2, sampling=sampling)
        assert served(port) == len(PROMPTS) - journaled  # counted by the server: only the unfinished prompts
        assert again.stats() == {"requests_sent": len(PROMPTS) - journaled, "prompts_sent": len(PROMPTS) - journaled,
                                 "prompts_from_journal": journaled, "retries": 0}
        # The server honours seeds, so the resumed run equals an uninterrupted one (no journal).
        fresh = OpenAIBackend(TINY, url, api_key_env=KEY_ENV, max_concurrency=4).generate(PROMPTS, 2, sampling)
        assert resumed == fresh and all(len(s) == 2 for s in resumed)
    finally:
        stop(proc)

    assert api_key not in repr(first) and api_key not in json.dumps(vars(first), default=str)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == JOURNAL_NAME for p in files)
    leaks = [p for p in files if api_key.encode() in p.read_bytes()]
    assert not leaks, f"API key written to {leaks}"


# --- scripted in-process servers -------------------------------------------------------------------------------


class Scripted:
    """A 127.0.0.1 server that plays `script` one request at a time, then `then` for every later request. A step
    is an HTTP status, ("sleep", seconds) then ok, "ok" (n choices of "hi", with `logprobs` as each one's
    logprobs.content when given), "few" (one choice whatever n), "empty" (no choices), or "garbage" (a 200 that is
    not JSON). A request whose messages contain `poison` gets
    400 whatever the script says. `bodies` keeps every request body."""

    def __init__(self, script=(), then="ok", poison=None, model=None, reply="hi", logprobs=None):
        self.script, self.then, self.count, self.lock = list(script), then, 0, threading.Lock()
        self.bodies, self.in_flight, self.peak = [], 0, 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.count += 1
                    outer.bodies.append(body)
                    step = outer.script.pop(0) if outer.script else outer.then
                    outer.in_flight += 1
                    outer.peak = max(outer.peak, outer.in_flight)
                try:
                    self.answer(body, step)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def answer(self, body, step):
                if poison and poison in json.dumps(body["messages"]):
                    step = 400
                if isinstance(step, tuple):
                    time.sleep(step[1])
                    step = "ok"
                if step in ("ok", "few", "empty"):
                    n = {"ok": body["n"], "few": 1, "empty": 0}[step]
                    payload = {"choices": [{"index": j, "message": {"role": "assistant", "content": reply},
                                            "finish_reason": "stop",
                                            **({"logprobs": {"content": logprobs}} if logprobs else {})}
                                           for j in range(n)],
                               "usage": {"prompt_tokens": 4, "completion_tokens": 2 * n}}
                    if model:
                        payload["model"] = model
                    data, status = json.dumps(payload).encode(), 200
                elif step == "garbage":
                    data, status = b"<html>502 Bad Gateway</html>", 200
                else:
                    data, status = b'{"error": {"message": "busy"}}', step
                try:
                    self.send_response(status)
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting (timeout test)
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the listen backlog: 5 by default, fewer than the clients of a busy test

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted():
    made = []

    def make(script=(), **kwargs):
        made.append(Scripted(script, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_retries_429_5xx_and_timeouts_then_succeeds(scripted):
    srv = scripted([429, 500, ("sleep", 1.0), 503])
    backend = OpenAIBackend("m", srv.url, api_key_env=None, timeout=0.3, max_retries=4, backoff=0.01,
                            min_tokens_per_s=1e9)
    out = backend.generate(PROMPTS[:1], n=2, sampling=Sampling())
    assert out == [[{"text": "hi", "prompt_tokens": 4, "completion_tokens": 2, "finish_reason": "stop"}] * 2]
    assert backend.retries == 4 and backend.requests_sent == 5 and srv.count == 5


def test_gives_up_after_bounded_attempts_with_a_clear_error(scripted):
    srv = scripted([503] * 10)
    backend = OpenAIBackend("m", srv.url, api_key_env=None, max_retries=2, backoff=0.01)
    with pytest.raises(RequestFailed, match=r"gave up after 3 attempts; last: HTTP 503"):
        backend.generate(PROMPTS[:1], n=1, sampling=Sampling())
    assert srv.count == 3


def test_both_base_urls_are_used(scripted):
    a, b = scripted(), scripted()
    backend = OpenAIBackend("m", [a.url, b.url], api_key_env=None, max_concurrency=2)
    out = backend.generate(PROMPTS[:8], n=1, sampling=Sampling())
    assert len(out) == 8 and a.count > 0 and b.count > 0 and a.count + b.count == 8


def test_a_retry_goes_to_the_other_server(scripted):
    down, up = scripted([500]), scripted()
    backend = OpenAIBackend("m", [down.url, up.url], api_key_env=None, max_concurrency=1, backoff=0.01)
    backend.generate(PROMPTS[:1], n=1, sampling=Sampling())
    assert (down.count, up.count, backend.retries) == (1, 1, 1)


def test_journal_survives_a_torn_last_line(scripted, tmp_path):
    srv = scripted()
    make = lambda: OpenAIBackend("m", srv.url, api_key_env=None, journal_dir=str(tmp_path))  # noqa: E731
    make().generate(PROMPTS[:2], 1, Sampling())
    with open(tmp_path / JOURNAL_NAME, "a") as f:
        f.write('{"key": "abc", "sam')  # a crash mid-write
    second = make()
    second.generate(PROMPTS[:3], 1, Sampling())
    assert (second.prompts_from_journal, second.prompts_sent) == (2, 1)
    third = make()
    third.generate(PROMPTS[:3], 1, Sampling())
    assert (third.prompts_from_journal, third.prompts_sent, srv.count) == (3, 0, 3)
    # A different sampling setting is a different request: not answered from the journal.
    third.generate(PROMPTS[:1], 1, Sampling(seed=1))
    assert third.prompts_sent == 1


def test_fewer_choices_than_asked_are_journaled_and_only_the_rest_asked_again(scripted, tmp_path):
    first = scripted(["few"], then=503)
    backend = OpenAIBackend("m", first.url, api_key_env=None, max_retries=0, journal_dir=str(tmp_path))
    with pytest.raises(RequestFailed, match="HTTP 503"):
        backend.generate(PROMPTS[:1], n=3, sampling=Sampling())
    second = scripted()
    again = OpenAIBackend("m", second.url, api_key_env=None, journal_dir=str(tmp_path))
    out = again.generate(PROMPTS[:1], n=3, sampling=Sampling())
    assert len(out[0]) == 3
    assert [b["n"] for b in second.bodies] == [2]  # the one journaled sample is not paid for twice
    assert second.bodies[0]["seed"] == first.bodies[0]["seed"] + 1


def test_a_poison_prompt_is_rejected_alone_and_most_rejected_fails(scripted):
    srv = scripted(poison="number 2:")
    backend = OpenAIBackend("m", srv.url, api_key_env=None, max_retries=3, backoff=0.01)
    with pytest.raises(PromptsRejected) as caught:
        backend.generate(PROMPTS[:6], n=2, sampling=Sampling())
    assert list(caught.value.rejected) == [2] and "HTTP 400" in caught.value.rejected[2]
    assert caught.value.results[2] is None and all(len(r) == 2 for i, r in enumerate(caught.value.results) if i != 2)
    assert srv.count == 6  # a rejection is not retried
    everything = scripted(poison="Question")
    with pytest.raises(RequestFailed, match="6 of 6 prompts rejected, which points at the request"):
        OpenAIBackend("m", everything.url, api_key_env=None).generate(PROMPTS[:6], n=1, sampling=Sampling())


def test_malformed_and_empty_replies_are_retried_and_shown(scripted):
    srv = scripted(["empty", "garbage"])
    backend = OpenAIBackend("m", srv.url, api_key_env=None, max_retries=2, backoff=0.01)
    assert len(backend.generate(PROMPTS[:1], n=2, sampling=Sampling())[0]) == 2
    assert backend.retries == 2
    bad = scripted(then="garbage")
    with pytest.raises(RequestFailed, match=r"gave up after 2 attempts; last: a malformed reply .*502 Bad Gateway"):
        OpenAIBackend("m", bad.url, api_key_env=None, max_retries=1, backoff=0.01).generate(
            PROMPTS[:1], n=1, sampling=Sampling())


def test_a_dead_endpoint_is_rested_so_the_live_one_does_the_work(scripted):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    live = scripted()
    backend = OpenAIBackend("m", [dead, live.url], api_key_env=None, max_concurrency=2, backoff=5.0)
    out = backend.generate(PROMPTS, n=1, sampling=Sampling())
    assert len(out) == 12 and live.count == 12
    wasted = backend.requests_sent - live.count
    assert wasted <= 2, wasted  # at most one refused attempt per worker before the dead one rests
    assert backend.endpoint_failures()[dead.rstrip("/") + "/chat/completions"] >= 1


def test_the_timeout_counts_the_tokens_asked_for(scripted):
    srv = scripted([("sleep", 1.0)])
    # 0.3 s of silence is allowed on top of 20 tokens at 10 tokens/s: the 1 s reply is not cut off and resent.
    backend = OpenAIBackend("m", srv.url, api_key_env=None, timeout=0.3, min_tokens_per_s=10, backoff=0.01)
    backend.generate(PROMPTS[:1], n=1, sampling=Sampling(max_new_tokens=20))
    assert backend.retries == 0 and srv.count == 1


def test_rows_record_the_served_model(scripted):
    srv = scripted(model="llama-3.1-405b-instruct-fp8")
    out = OpenAIBackend("meta-llama/Llama-3.1-405B-Instruct", srv.url, api_key_env=None).generate(
        PROMPTS[:1], n=1, sampling=Sampling())
    assert out[0][0]["model"] == "llama-3.1-405b-instruct-fp8"


def test_top_logprobs_map_back_to_ids_that_spell_the_text(server):
    """Token-level distillation from an endpoint: the reply's tokens (text and bytes, or vLLM's token_id:N) read
    as the local tokenizer's ids are the ones the model generated, with the same top-k log-probs."""
    url = f"http://127.0.0.1:{server}"
    sampling = Sampling(temperature=1.0, max_new_tokens=10, seed=2, top_logprobs=5)
    with pytest.raises(ValueError, match="needs `tokenizer`"):
        OpenAIBackend(TINY, url, api_key_env=KEY_ENV).generate(PROMPTS[:1], 1, sampling)
    backend = OpenAIBackend(TINY, url, api_key_env=KEY_ENV, tokenizer=TINY)
    out = backend.generate(PROMPTS[:3], n=2, sampling=sampling)
    assert all(b["logprobs"] is True and b["top_logprobs"] == 5 for b in [backend._body(PROMPTS[0], 2, sampling, 0)])
    hf = HFBackend(TINY)
    for i, samples in enumerate(out):
        seed = backend._body(PROMPTS[i], 2, sampling, i)["seed"]
        want = hf.generate([PROMPTS[i]], 2, dataclasses.replace(sampling, seed=seed))[0]
        for s, w in zip(samples, want):
            assert hf.tokenizer.decode(s["completion_ids"], skip_special_tokens=True) == s["text"] == w["text"]
            assert (s["completion_ids"], s["topk_ids"]) == (w["completion_ids"], w["topk_ids"])
            assert sum(s["topk_logprobs"], []) == pytest.approx(sum(w["topk_logprobs"], []), abs=1e-6)
            assert s["completion_tokens"] == len(s["completion_ids"])
    as_ids = OpenAIBackend(TINY, url, api_key_env=KEY_ENV, tokenizer=TINY,
                           extra_body={"return_tokens_as_token_ids": True})
    assert as_ids.generate(PROMPTS[:3], n=2, sampling=sampling) == out


def test_endpoint_tokens_outside_the_vocabulary_or_not_spelling_the_text_stop_the_call(scripted):
    """The vocabulary check of a served teacher: every token must be one of the local tokenizer's and the tokens
    must spell the reply; either failure is not retried and suggests sequence-level distillation."""
    sampling = Sampling(max_new_tokens=4, top_logprobs=1)

    def entry(text):
        return {"token": text, "logprob": -0.5, "bytes": list(text.encode()),
                "top_logprobs": [{"token": text, "logprob": -0.5, "bytes": list(text.encode())}]}

    for content, error in (([entry("h"), entry("i")], None),
                           ([entry("h"), entry("o")], "spell 'o' where the teacher wrote 'i'"),
                           ([entry("hi\u2603 no such token")], "not one token of the local tokenizer")):
        srv = scripted(logprobs=content)
        backend = OpenAIBackend(TINY, srv.url, api_key_env=None, tokenizer=TINY, max_retries=2)
        if error is None:
            assert backend.generate(PROMPTS[:1], 1, sampling)[0][0]["topk_logprobs"] == [[-0.5], [-0.5]]
            continue
        with pytest.raises(RequestFailed, match=error) as info:
            backend.generate(PROMPTS[:1], 1, sampling)
        assert "sequence-level distillation" in str(info.value) and srv.count == 1
    srv = scripted()  # a server that ignores logprobs
    with pytest.raises(RequestFailed, match="without logprobs"):
        OpenAIBackend(TINY, srv.url, api_key_env=None, tokenizer=TINY).generate(PROMPTS[:1], 1, sampling)


# --- the generate stage on an endpoint ------------------------------------------------------------------------


def run_generate(tmp_path, backend: dict, num_prompts: int = 20, poison_row: bool = False):
    """The real generate stage, through a RunDir, on `num_prompts` prompts of a file of 24, with `backend`."""
    from data_gen.generate import generate
    from posttrain.config import DataConfig, GenerateConfig, GenerateJob
    from posttrain.rundir import RunDir, Stage

    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        with open(prompts, "w") as f:
            for i in range(24):
                text = "POISON: this one is always refused" if poison_row and i == 5 else f"Question {i}: hello?"
                f.write(json.dumps({"id": f"p{i}", "prompt": text}) + "\n")
    rd = RunDir(tmp_path / "run", [Stage("generate", generate, True, None)])
    try:
        job = GenerateJob(generate=GenerateConfig(k=2, backend=backend), data=DataConfig(
            prompts=str(prompts), num_prompts=num_prompts), round=1, seed=0)
        return rd.run_stage(1, "generate", job, {"prompts": str(prompts), "model": "teacher-405b"})
    finally:
        rd.close()


def test_a_stage_cut_short_reruns_on_other_servers_sending_only_unfinished_prompts(scripted, tmp_path):
    from posttrain.rundir import StageError

    first = scripted(["ok"] * 7, then=503)  # answers 7 prompts, then fails for good
    endpoint = {"_target_": "data_gen.openai_backend.OpenAIBackend", "api_key_env": None, "max_concurrency": 4}
    with pytest.raises(StageError, match="HTTP 503"):
        run_generate(tmp_path, {**endpoint, "base_urls": [first.url], "max_retries": 0})
    second = scripted()
    # Another base URL, more retries, more concurrency: the same stage, resumed from its journal.
    entry = run_generate(tmp_path, {**endpoint, "base_urls": [second.url], "max_retries": 5, "max_concurrency": 8})
    assert second.count == 20 - 7
    assert entry["metrics"]["backend"]["prompts_from_journal"] == 7
    third = scripted()
    again = run_generate(tmp_path, {**endpoint, "base_urls": [third.url, second.url], "timeout": 600})
    assert third.count == 0 and again == entry  # finished: skipped, no StageChanged


def test_a_poison_prompt_is_quarantined_with_its_id_and_the_stage_goes_on(scripted, tmp_path):
    srv = scripted(poison="POISON")
    endpoint = {"_target_": "data_gen.openai_backend.OpenAIBackend", "api_key_env": None, "base_urls": [srv.url]}
    entry = run_generate(tmp_path, endpoint, num_prompts=24, poison_row=True)
    assert entry["metrics"]["quarantined"] == {"empty_prompt": 0, "rejected_by_backend": 1}
    assert entry["rows"] == 23 * 2
    (record,) = [json.loads(line) for line in open(tmp_path / "run" / entry["dir"] / "quarantine.jsonl")]
    assert record["prompt_id"] == "p5" and "HTTP 400" in record["reason"]
    import datasets

    rows = datasets.load_from_disk(str(tmp_path / "run" / entry["dir"] / "generations"))
    assert "p5" not in set(rows["prompt_id"]) and set(rows["model"]) == {"teacher-405b"}


def test_requests_in_flight_reach_max_concurrency_within_one_shard(scripted):
    from data_gen.generate import shard_size
    from posttrain.config import GenerateConfig

    srv = scripted(then=("sleep", 0.5))
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(64)]
    OpenAIBackend("m", srv.url, api_key_env=None, max_concurrency=32).generate(prompts, 1, Sampling())
    assert srv.peak == 32
    endpoint = {"_target_": "data_gen.openai_backend.OpenAIBackend", "base_urls": [srv.url]}
    assert shard_size(GenerateConfig(backend=endpoint)) == 256  # not the 8 of a local batch
    assert shard_size(GenerateConfig(backend=endpoint, shard_size=1000)) == 1000
    assert shard_size(GenerateConfig()) == 8  # the hf backend's batch
    vllm = {"_target_": "data_gen.vllm_backend.VLLMBackend", "batch_size": 8}
    assert shard_size(GenerateConfig(backend=vllm)) == 2048  # thousands of prompts keep the engine full


def test_prompts_answered_earlier_count_when_judging_a_request_broken(scripted, tmp_path):
    srv = scripted(poison="number 1")  # prompts 1, 10 and 11 are always refused
    for _ in range(2):  # the rerun answers 9 from the journal and sends only the 3 refused ones
        backend = OpenAIBackend("m", srv.url, api_key_env=None, journal_dir=str(tmp_path))
        with pytest.raises(PromptsRejected) as caught:  # 3 of 12 refused: the prompts, not the request
            backend.generate(PROMPTS, 1, Sampling())
        assert sorted(caught.value.rejected) == [1, 10, 11]
    assert backend.prompts_from_journal == 9 and srv.count == 12 + 3


def test_an_endpoint_down_for_long_never_overflows_its_rest(scripted):
    backend = OpenAIBackend("m", [scripted().url], api_key_env=None)
    url = backend._acquire(None)
    backend._failures[0] = 5000
    backend._release(url, ok=False)
    assert backend._resting_until[0] > 0


def test_a_judge_scores_a_refused_answer_none(scripted):
    from reward.judge import LLMJudge

    srv = scripted(poison="LONG", reply="Score: 7")
    judge = LLMJudge(backend=OpenAIBackend("judge", srv.url, api_key_env=None))
    prompts = [{"prompt_id": str(i), "messages": [{"role": "user", "content": "q"}]} for i in range(4)]
    assert judge(prompts, ["fine", "LONG answer", "fine", "fine"]) == [2 / 3, None, 2 / 3, 2 / 3]
    assert srv.count == 4


def test_the_evals_teacher_answers_survive_a_crash_and_a_refused_prompt_gets_an_empty_answer(scripted, tmp_path):
    """Round 0's eval asks an endpoint teacher for its held-out answers: a crash keeps the journal (the eval stage
    resumes from its partial folder), and a prompt the server refuses is answered empty, not fatal."""
    from evals.stage import eval_stage, load_responses
    from posttrain.config import EvalConfig, EvalJob
    from posttrain.rundir import RunDir, Stage, StageError

    heldout = ROOT / "evals" / "data" / "tiny_heldout.jsonl"
    n = sum(1 for _ in open(heldout))

    def run(srv, retries):
        teacher = {"_target_": "data_gen.openai_backend.OpenAIBackend", "base_urls": [srv.url],
                   "api_key_env": None, "max_retries": retries, "max_concurrency": 1}
        evals = EvalConfig(heldout=str(heldout), teacher_backend=teacher, rewards={},
                           backend={"_target_": "data_gen.hf_backend.HFBackend"}, max_new_tokens=4,
                           suites={"drift": {"_target_": "evals.suites.Drift"}})
        rd = RunDir(tmp_path / "run", [Stage("eval", eval_stage, True, None)])
        try:
            return rd.run_stage(0, "eval", EvalJob(evals=evals, round=0),
                                {"policy": TINY, "heldout": str(heldout), "teacher": "teacher-405b"})
        finally:
            rd.close()

    first = scripted(["ok"] * 5, then=503)
    with pytest.raises(StageError, match="HTTP 503"):
        run(first, retries=0)
    second = scripted(poison="violin")  # heldout-008 is refused (it was not among the first 5)
    entry = run(second, retries=2)
    assert second.count == n - 5  # the 5 journaled answers are not paid for twice
    teacher = load_responses(str(tmp_path / "run" / entry["dir"] / "teacher_responses"))
    refused = [r for r in teacher if r["finish_reason"] == "rejected"]
    assert len(teacher) == n and [r["prompt_id"] for r in refused] == ["heldout-008"] and refused[0]["text"] == ""
