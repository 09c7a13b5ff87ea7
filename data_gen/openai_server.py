"""A small OpenAI-compatible `/v1/chat/completions` server over `HFBackend`, for tests and local experiments.

    python -m data_gen.openai_server --model tiny://layers=2,hidden=64,seed=0 --port 8000 [--api-key-env VAR]

Binds 127.0.0.1 only. Supports n, temperature, top_p, max_tokens, seed, and logprobs / top_logprobs (each
generated token's text, bytes and log-prob with its top alternatives, as the OpenAI API reports them; vLLM's
`return_tokens_as_token_ids` too); answers one request at a time (the model is not shared between threads).
With `--api-key-env VAR` every request must carry `Bearer $VAR` (the key is read from the environment, so it
never shows in the process list). `GET /stats` tells how many completion requests were answered, so tests can
count what a client sent. Prints `listening on http://127.0.0.1:PORT` once the model is loaded (`--port 0` picks a
free port).
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from data_gen.backend import Sampling
from data_gen.hf_backend import HFBackend
from data_gen.logprobs import TokenIds


def _logprobs(tokens: TokenIds, sample: dict, top: int, as_ids: bool) -> dict:
    """A choice's `logprobs` object: one entry per generated token, the end-of-turn token included."""
    ids = sample["completion_ids"] + ([sample["stop_token_id"]] if sample["stop_token_id"] is not None else [])
    return {"content": [
        {**tokens.entry(t, lp, as_ids),
         "top_logprobs": [tokens.entry(i, v, as_ids) for i, v in list(zip(top_ids, top_lps))[:top]]}
        for t, lp, top_ids, top_lps in zip(ids, sample["token_logprobs"], sample["topk_ids"],
                                           sample["topk_logprobs"])]}


def make_handler(backend: HFBackend, model_name: str, api_key: str | None, delay: float):
    lock = threading.Lock()
    tokens = TokenIds(backend.tokenizer)
    stats = {"chat_requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # quiet: one line per request would drown test output
            pass

        def _send(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/stats":
                self._send(200, dict(stats))
            elif self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if api_key is not None:
                given = self.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return self._send(401, {"error": {"message": "invalid API key", "type": "authentication_error"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages, n = body["messages"], int(body.get("n") or 1)
                top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
                sampling = Sampling(
                    top_logprobs=max(top, 1) if body.get("logprobs") else 0,
                    temperature=float(body.get("temperature", 1.0)),
                    top_p=float(body.get("top_p", 1.0)),
                    max_new_tokens=int(body.get("max_tokens") or 256),
                    seed=int(body["seed"]) if body.get("seed") is not None else int.from_bytes(os.urandom(4)) // 2,
                )
            except (ValueError, KeyError, TypeError) as err:
                return self._send(400, {"error": {"message": f"bad request: {err!r}"}})
            if body.get("model") != model_name:  # as vLLM does: a wrong name is a config error, not a retry
                return self._send(404, {"error": {"message": f"model {body.get('model')!r} is not served here; "
                                                             f"this server has {model_name!r}"}})
            time.sleep(delay)
            with lock:
                samples = backend.generate([messages], n, sampling)[0]
                stats["chat_requests"] += 1
            self._send(200, {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": j, "message": {"role": "assistant", "content": s["text"]},
                             "finish_reason": s["finish_reason"],
                             **({"logprobs": _logprobs(tokens, s, top, bool(body.get("return_tokens_as_token_ids")))}
                                if body.get("logprobs") else {})} for j, s in enumerate(samples)],
                # Like real servers: one prompt count, completion tokens summed over the choices.
                "usage": {"prompt_tokens": samples[0]["prompt_tokens"],
                          "completion_tokens": sum(s["completion_tokens"] for s in samples),
                          "total_tokens": samples[0]["prompt_tokens"] + sum(s["completion_tokens"] for s in samples)},
            })

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="any model spec posttrain.models resolves")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port, printed at start")
    parser.add_argument("--served-model-name", default=None, help="the name reported back (default: --model)")
    parser.add_argument("--api-key-env", default=None, help="environment variable holding the required key")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto",
                        help="auto (bf16 where the hardware has it, posttrain.models.inference_dtype), float32, ...")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each completion (tests)")
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    with contextlib.redirect_stdout(sys.stderr):  # stdout's first line is the address, for whoever started us
        backend = HFBackend(args.model, batch_size=args.batch_size, dtype=args.dtype)
    handler = make_handler(backend, args.served_model_name or args.model, api_key, args.delay)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
