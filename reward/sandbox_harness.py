"""The process inside the code sandbox (see `reward.sandbox`): never imported by posttrain, run as a script.

It runs as `python -I -S -B -X utf8 harness.py` with its job as JSON on stdin, in the sandbox's work dir:
it sets the rlimits, writes the code to `main.py`, runs it as `__main__`, then, for a scoring job, runs each test
step and writes one JSON line per step to the results descriptor the parent handed it:
`{"step": i, "value": ...}` (an expression's value, encoded by `encode`, judged by the parent against an
expected value the sandbox never sees), `{"step": i, "ok": true|false}` (a step judged here) or
`{"step": i, "error": "..."}`. Only the standard library is imported, and as little of it as possible: its
import time is paid by every sandboxed run.
"""

import json
import os
import signal
import sys
import time


def encode(value, depth: int = 0):
    """A JSON form of a plain value that keeps its type (tuple vs list, int vs float, bytes, sets).

    A subclass of a built-in type (Counter, OrderedDict, a namedtuple, an int subclass) is encoded as its base
    type, read through the base type's own methods, so its overridden `__eq__` or `__iter__` plays no part: a
    Counter compares with a dict as in Python, an int subclass equal to everything is just its int. Any other
    object raises TypeError, and the step fails."""
    if depth > 64:
        raise ValueError("the value is nested more than 64 levels deep")
    if value is None or type(value) is bool:
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return {"int": int.__repr__(value)}
    if isinstance(value, float):
        return {"float": float.hex(value)}
    if isinstance(value, complex):
        return {"complex": [float.hex(complex.real.__get__(value)), float.hex(complex.imag.__get__(value))]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes.hex(value) if isinstance(value, bytes) else bytearray.hex(value)}
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return {base.__name__: [encode(item, depth + 1) for item in base.__iter__(value)]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in dict.items(value)]}
    raise TypeError(f"a value of type {type(value).__name__} cannot be judged outside the sandbox")


class _OutOfTime(BaseException):  # not an Exception: `except Exception` in the code under test must not eat it
    pass


def _limit(job: dict) -> None:
    import resource

    seconds = int(job["timeout"]) + 2  # a backstop: the parent's wall-clock timeout comes first
    limits = {"RLIMIT_AS": job["memory_mb"] << 20, "RLIMIT_CPU": seconds, "RLIMIT_FSIZE": job["max_file_mb"] << 20,
              "RLIMIT_NOFILE": 64, "RLIMIT_CORE": 0, "RLIMIT_NPROC": job["max_procs"]}
    for name, value in limits.items():
        if value is not None and hasattr(resource, name):
            try:
                resource.setrlimit(getattr(resource, name), (value, value))
            except (ValueError, OSError):  # e.g. above a hard limit we may not raise
                pass


def _run_steps(namespace: dict, steps: list, results: int, deadline: float) -> None:
    write, dumps, monotonic, compile_, eval_, exec_ = os.write, json.dumps, time.monotonic, compile, eval, exec

    def out_of_time(signum, frame):
        raise _OutOfTime("the test took longer than its share of the time limit")

    def send(record: dict) -> None:
        try:
            line = dumps(record)
        except (TypeError, ValueError, RecursionError) as e:
            line = dumps({"step": record["step"], "error": f"{type(e).__name__}: {e}"})
        write(results, (line + "\n").encode())

    left = len(steps)
    for index, (source, mode) in enumerate(steps):
        # Each step gets an equal share of the time left, so one endless test does not sink the others.
        signal.signal(signal.SIGALRM, out_of_time)
        signal.setitimer(signal.ITIMER_REAL, max(0.05, (deadline - monotonic()) / max(left, 1)))
        left -= 1
        try:
            try:
                if mode == "value":
                    record = {"step": index, "value": encode(eval_(compile_(source, "<test>", "eval"), namespace))}
                else:
                    exec_(compile_(source, "<test>", "exec"), namespace)
                    record = {"step": index, "ok": True}
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException as e:  # SystemExit and KeyboardInterrupt from the code under test fail the step too
            try:
                reason = f"{type(e).__name__}: {e}"[:300]
            except BaseException:
                reason = "an exception that cannot be shown"
            record = {"step": index, "error": reason} if mode == "value" else {"step": index, "ok": False}
        if mode == "setup":
            continue
        try:
            send(record)
        except OSError:  # the code closed or replaced the descriptor: the parent counts missing steps as failed
            pass


def main() -> None:
    start = time.monotonic()
    job = json.loads(sys.stdin.buffer.read())
    with open("stdin.txt", "w", encoding="utf-8") as f:
        f.write(job.get("stdin") or "")
    fd = os.open("stdin.txt", os.O_RDONLY)
    os.unlink("stdin.txt")
    os.dup2(fd, 0)  # the program's input; the job (and what it says about the tests) cannot be read back
    os.close(fd)
    with open("main.py", "w", encoding="utf-8", errors="backslashreplace") as f:
        f.write(job["code"])  # a real file, so tracebacks show the offending line
    _limit(job)
    module = type(sys)("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module  # the user's code runs as __main__, not in this script's globals
    sys.argv = ["main.py"]
    steps, results = job.get("steps"), job.get("results_fd")
    with open("main.py", encoding="utf-8") as f:
        code = compile(f.read(), "main.py", "exec")
    exec(code, module.__dict__)
    if steps:
        _run_steps(module.__dict__, steps, results, start + 0.8 * job["timeout"])
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        os._exit(0)  # no atexit handlers or thread joins of the user's: they could hang or write after us


if __name__ == "__main__":
    main()
