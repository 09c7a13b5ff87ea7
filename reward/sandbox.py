"""Run model-written Python against unit tests in a constrained subprocess (Llama 3, "Capability data: Code").

`run_python` starts `python -I -S -B` on this very file; the child reads its job from stdin, locks itself down,
then runs the code (and, for `CodeExecution`, the tests). Every layer below is tried; one the kernel or the
permissions do not allow is skipped silently, so the same code runs on a laptop and on a root CI box.

What is isolated:
- process: a new session (a timeout SIGKILLs the whole group); no environment variables, no site-packages, no
  .pyc writes; cwd, HOME and TMPDIR are a fresh temp dir, removed afterwards; stdin is /dev/null.
- resources (setrlimit): address space (memory_mb), CPU seconds, size of any file written (max_file_mb, stdout
  and stderr included), 64 open files, no core dumps, RLIMIT_NPROC = max_procs (processes *and threads* of the
  whole user, so 0 is the only value meaning the same everywhere; not enforced for root).
- seccomp-BPF (x86_64, aarch64): fork/vfork/clone of a process, execve, socket(), ptrace, mount, setns/unshare,
  chown, module loading, reboot, bpf, raising rlimits and signalling other processes all fail; threads work.
- Landlock (Linux >= 5.13): files may be created, written, renamed or deleted only inside the temp dir (and
  /dev/null); from Landlock ABI 4 no TCP connect/bind, from ABI 6 no signals or abstract unix sockets outside.
- network namespace (unshare(CLONE_NEWNET), needs CAP_SYS_ADMIN, e.g. root): only a loopback that is down.
- a Python audit hook (PEP 578), installed before the user code: os.fork/exec/system/posix_spawn, subprocess,
  ctypes, socket connect/bind/DNS, writes/renames/chmod outside the temp dir, os.kill of other processes,
  setrlimit and gc object walks raise PermissionError. It gives a readable error first; the kernel layers hold
  when code gets around it (audit hooks are not a security boundary).

What is not isolated:
- reading: the code can read every file the parent's user can (as root: all) and print it to its stdout.
- the host kernel is shared: this is defence in depth against buggy or reward-hacking model code, not a security
  boundary like a container with gVisor or a VM. Run untrusted code at scale inside one of those as well.
- as root, privileges are not dropped (the interpreter may live in a 0700 home such as /root/.pyenv) and
  RLIMIT_NPROC is void; seccomp and the audit hook are what stop a fork bomb. chmod and utime outside the temp
  dir are refused by the audit hook only (Landlock does not cover them).
- on other kernels/architectures (no seccomp, no Landlock) only the rlimits and the audit hook remain.
- the tests run in the same process as the code: code that walks interpreter frames (sys._getframe) could find
  the result marker, and an object that compares equal to everything passes `assert f() == 3`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class ExecResult:
    """What a sandboxed run did: exit status, its output (at most max_file_mb each) and how long it took."""

    returncode: int  # negative: killed by that signal (-9 after a timeout, -24 out of CPU seconds)
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def run_python(
    code: str, timeout: float = 5.0, memory_mb: int = 512, max_file_mb: int = 10, max_procs: int | None = 0
) -> ExecResult:
    """Run `code` as a script in the sandbox described above; never raises for anything the code does.

    `timeout` is wall-clock seconds (then the process group is killed and `timed_out` is set), `memory_mb` the
    address-space limit, `max_file_mb` the largest file it may write (stdout and stderr included), `max_procs`
    the RLIMIT_NPROC value (None: leave it). The code gets the standard library only.

    >>> result = run_python("print(6 * 7)")
    >>> result.returncode, result.stdout, result.timed_out
    (0, '42\\n', False)
    >>> run_python("import os; os.fork()").stderr.splitlines()[-1]
    'PermissionError: sandbox: os.fork is not allowed'
    """
    return _execute({}, code, timeout, memory_mb, max_file_mb, max_procs)


def _execute(job: dict, code: str, timeout: float, memory_mb: int, max_file_mb: int, max_procs: int | None):
    # Imported here, not at the top: the sandboxed child runs this file, and a subprocess module loaded before
    # its lock-down would keep the real fork_exec that _lock_down replaces.
    import subprocess

    root = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    workdir = os.path.join(root, "work")
    job = {**job, "workdir": workdir, "timeout": timeout, "memory_mb": memory_mb, "max_file_mb": max_file_mb,
           "max_procs": max_procs}
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    out_path, err_path = os.path.join(root, "stdout"), os.path.join(root, "stderr")
    try:
        os.mkdir(workdir)
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(code)  # a real file, so tracebacks show the offending line
        start = time.monotonic()
        # stdout/stderr go to files, not pipes: RLIMIT_FSIZE then caps them, and a print loop cannot fill our RAM.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__)],
                stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=workdir, env=env, start_new_session=True,
            )
            timed_out = False
            try:
                proc.communicate(json.dumps(job).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet, so the group id is still ours
                except ProcessLookupError:
                    pass
                proc.communicate()
        seconds = time.monotonic() - start
        with open(out_path, "rb") as out, open(err_path, "rb") as err:
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        return ExecResult(proc.returncode, stdout, stderr, timed_out, seconds)
    finally:
        _remove(root)


def _remove(root: str) -> None:
    # The code may have left a chmod 000 directory that a non-root parent cannot descend into. Never chmod
    # through a symlink: it may point anywhere on the machine.
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                try:
                    os.chmod(path, 0o700)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)


_FENCED = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The last ```python block of `response`, else its last fenced block, else the whole text.

    >>> extract_code("Try:\\n```python\\nx = 1\\n```\\nthen\\n```\\nrun it\\n```")
    'x = 1\\n'
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCED.findall(response)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    return python[-1] if python else blocks[-1][1] if blocks else response


def _test_steps(tests: list[str] | str) -> list[tuple[str, bool]]:
    """(source, counts as a test) in run order: each string of a list is a test; in one string of test code
    each top-level assert is a test and other statements (imports, helpers) run as setup."""
    if isinstance(tests, list):
        return [(test, True) for test in tests]
    try:
        body = ast.parse(tests).body
    except SyntaxError:
        return [(tests, True)]
    if not any(isinstance(node, ast.Assert) for node in body):  # e.g. HumanEval's `check(candidate)`
        return [(tests, True)]
    return [(ast.unparse(node), isinstance(node, ast.Assert)) for node in body]


class CodeExecution:
    """Fraction of the prompt's unit tests the response's code passes; 0.0 when the code fails to run or times
    out; None when the prompt has no tests.

    `prompts[i][tests_key]` is a list of assert statements (MBPP style) or one string of test code. The code is
    the response's last ```python block (see `extract_code`). All tests of one response run in one sandboxed
    process (see `run_python`), each in its own try/except with a share of the time limit; the results come
    back on one stdout line behind a random marker, so printing a fake result line does not count.

    >>> reward = CodeExecution()
    >>> prompt = {"prompt_id": "a", "tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]}
    >>> reward([prompt, {"prompt_id": "b"}], ["```python\\ndef add(a, b):\\n    return a + b\\n```", "hi"])
    [0.5, None]
    """

    def __init__(self, tests_key: str = "tests", timeout: float = 5.0, memory_mb: int = 512, max_workers: int = 2):
        self.tests_key = tests_key
        self.timeout = timeout
        self.memory_mb = memory_mb
        self.max_workers = max_workers

    def score(self, tests: list[str] | str, response: str) -> float:
        """The fraction of `tests` that the code in `response` passes."""
        steps = _test_steps(tests)
        marker = f"@@posttrain-sandbox-{secrets.token_hex(16)}@@"
        job = {"steps": steps, "marker": marker}
        result = _execute(job, extract_code(response), self.timeout, self.memory_mb, max_file_mb=10, max_procs=0)
        # Exactly one marker: a second one means the output was tampered with, whatever it says.
        if result.stdout.count(marker) != 1:
            return 0.0
        try:
            passed = json.loads(result.stdout.split(marker, 1)[1].split("\n", 1)[0])["passed"]
        except (ValueError, KeyError, TypeError):
            return 0.0
        if not isinstance(passed, list) or len(passed) != sum(counted for _, counted in steps) or not passed:
            return 0.0
        return sum(p is True for p in passed) / len(passed)

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        jobs = [(prompt.get(self.tests_key), response) for prompt, response in zip(prompts, responses, strict=True)]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            futures = [pool.submit(self.score, tests, response) if tests else None for tests, response in jobs]
            return [future.result() if future else None for future in futures]


# --- the child: runs as `python -I -S -B sandbox.py` with the job on stdin ----------------------------------------

# Syscalls that fail with EPERM, and their numbers per architecture (from the kernel's unistd headers); clone,
# clone3, kill, tgkill and prlimit64 get argument checks instead. aarch64 has no fork/vfork/chown/lchown.
_DENIED = ("fork vfork execve execveat socket ptrace process_vm_writev io_uring_setup pidfd_send_signal tkill mount "
           "umount2 pivot_root open_tree move_mount fsopen fsconfig fsmount fspick reboot init_module finit_module "
           "delete_module kexec_load kexec_file_load setns unshare bpf setrlimit chown fchown lchown fchownat").split()
_NEW = dict(io_uring_setup=425, pidfd_send_signal=424, open_tree=428, move_mount=429, fsopen=430, fsconfig=431,
            fsmount=432, fspick=433, clone3=435)  # syscalls added since 5.1 have one number on every architecture
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(_NEW, fork=57, vfork=58, execve=59, execveat=322, socket=41, ptrace=101,
                                process_vm_writev=311, tkill=200, mount=165, umount2=166, pivot_root=155, reboot=169,
                                init_module=175, finit_module=313, delete_module=176, kexec_load=246,
                                kexec_file_load=320, setns=308, unshare=272, bpf=321, setrlimit=160, chown=92,
                                fchown=93, lchown=94, fchownat=260, clone=56, kill=62, tgkill=234, prlimit64=302)),
    "aarch64": (0xC00000B7, dict(_NEW, execve=221, execveat=281, socket=198, ptrace=117, process_vm_writev=271,
                                 tkill=130, mount=40, umount2=39, pivot_root=41, reboot=142, init_module=105,
                                 finit_module=273, delete_module=106, kexec_load=104, kexec_file_load=294, setns=268,
                                 unshare=97, bpf=280, setrlimit=164, fchown=55, fchownat=54, clone=220, kill=129,
                                 tgkill=131, prlimit64=261)),
}


def _seccomp(libc, ctypes) -> bool:
    if os.uname().machine not in _SYSCALLS:
        return False
    arch, nr = _SYSCALLS[os.uname().machine]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38, 0x80000000
    # (opcode, k, label if true, label if false); a bare string is a label, resolved to a forward offset below.
    prog = [(ld, 4, None, None), (jeq, arch, "nr", "kill"),  # another ABI (int 0x80) numbers syscalls differently
            "nr", (ld, 0, None, None), (jge, 0x40000000, "deny", None)]  # x86's x32 ABI: numbers with bit 30 set
    prog += [(jeq, nr[name], "deny", None) for name in _DENIED if name in nr]
    prog += [(jeq, nr["clone3"], "enosys", None),  # its flags sit behind a pointer; glibc falls back to clone()
             (jeq, nr["clone"], "clone", None),
             (jeq, nr["kill"], "pid", None), (jeq, nr["tgkill"], "pid", None),
             (jeq, nr["prlimit64"], "prlimit", None),
             (ret, allow, None, None),
             "clone", (ld, 16, None, None), (jset, 0x00010000, "allow", "deny"),  # CLONE_THREAD: a thread is fine
             "pid", (ld, 16, None, None), (jeq, os.getpid(), "allow", None), (jeq, 0, "allow", "deny"),
             "prlimit", (ld, 32, None, None), (jeq, 0, None, "deny"),  # getrlimit passes new_limit = NULL
             (ld, 36, None, None), (jeq, 0, "allow", "deny"),
             "allow", (ret, allow, None, None), "deny", (ret, eperm, None, None),
             "enosys", (ret, enosys, None, None), "kill", (ret, kill, None, None)]
    labels, code = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(code)
        else:
            code.append(item)

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    def jump(i, label):
        return 0 if label is None else labels[label] - i - 1

    filters = (Filter * len(code))(*[Filter(op, jump(i, t), jump(i, f), k) for i, (op, k, t, f) in enumerate(code)])
    ulong = ctypes.c_ulong
    if libc.prctl(38, ulong(1), ulong(0), ulong(0), ulong(0)) != 0:  # PR_SET_NO_NEW_PRIVS
        return False
    program = Program(len(code), filters)
    return libc.prctl(22, ulong(2), ctypes.byref(program), ulong(0), ulong(0)) == 0  # PR_SET_SECCOMP, FILTER


def _landlock(libc, ctypes, workdir: str) -> bool:
    syscall, long = libc.syscall, ctypes.c_long
    syscall.restype = long
    abi = syscall(long(444), None, long(0), long(1))  # landlock_create_ruleset(VERSION): same number everywhere
    if abi < 1:
        return False
    write_file, truncate = 1 << 1, (1 << 14 if abi >= 3 else 0)
    # Every right that changes the file tree (write, remove, make *, refer, truncate); reads stay unrestricted.
    fs = write_file | sum(1 << bit for bit in range(4, 13)) | (1 << 13 if abi >= 2 else 0) | truncate
    net = 0b11 if abi >= 4 else 0  # TCP bind and connect, with no rule allowing any port
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals outside this process
    attr = (ctypes.c_uint64 * 3)(fs, net, scoped)
    ruleset = syscall(long(444), ctypes.byref(attr), long(8 if abi < 4 else 16 if abi < 6 else 24), long(0))
    if ruleset < 0:
        return False

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    try:
        for path, access in ((workdir, fs), (os.devnull, write_file | truncate)):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            rule = PathBeneath(access, fd)
            added = syscall(long(445), long(ruleset), long(1), ctypes.byref(rule), long(0))
            os.close(fd)
            if added != 0:
                return False
        if libc.prctl(38, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
            return False
        return syscall(long(446), long(ruleset), long(0)) == 0
    finally:
        os.close(ruleset)


def _lock_down(job: dict) -> None:
    """Apply the limits and layers of the module docstring to this process, before any user code runs."""
    import ctypes
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
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.unshare(0x40000000)  # CLONE_NEWNET: fails without CAP_SYS_ADMIN, and then the other layers still hold
        _landlock(libc, ctypes, job["workdir"])
        _seccomp(libc, ctypes)
    # Forks that skip the audited os/subprocess functions go through this; seccomp refuses them too.
    import _posixsubprocess

    def refused(*args, **kwargs):
        raise PermissionError("sandbox: _posixsubprocess.fork_exec is not allowed")

    _posixsubprocess.fork_exec = refused
    if job.get("audit", True):
        sys.addaudithook(_audit_hook(job["workdir"]))


_BLOCKED_EVENTS = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo", "resource.setrlimit",
    "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
}
# event -> (path argument, its dir_fd argument or None) pairs that must lie inside the temp dir
_PATH_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.truncate": ((0, None),), "os.utime": ((0, 3),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "os.chflags": ((0, None),), "os.lchflags": ((0, None),),
}


def _audit_hook(workdir: str):
    inside = os.path.realpath(workdir) + os.sep
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    getpid, readlink, realpath, join, fsdecode = os.getpid, os.readlink, os.path.realpath, os.path.join, os.fsdecode

    def allowed(path, dir_fd) -> bool:
        if isinstance(path, int):  # an open descriptor: judge the file it points to
            path = readlink(f"/proc/self/fd/{path}")
        path = fsdecode(path)
        if dir_fd not in (None, -1):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = realpath(path)
        return real + os.sep == inside or real.startswith(inside) or real == os.devnull

    def hook(event: str, args: tuple) -> None:
        if event in _BLOCKED_EVENTS or event.startswith("ctypes."):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, _, flags = args
            if flags & writing and not isinstance(path, int) and not allowed(path, None):
                raise PermissionError(f"sandbox: writing {path!r} is not allowed outside {workdir}")
        elif event in _PATH_EVENTS:
            for index, dir_fd in _PATH_EVENTS[event]:
                if not allowed(args[index], None if dir_fd is None else args[dir_fd]):
                    raise PermissionError(f"sandbox: {event} of {args[index]!r} is not allowed outside {workdir}")
        elif event in ("os.kill", "os.killpg") and args[0] not in (0, getpid()):
            raise PermissionError(f"sandbox: {event} of another process is not allowed")
        elif event == "sqlite3.connect" and args[0] != ":memory:" and not allowed(args[0], None):
            raise PermissionError("sandbox: sqlite3 files outside the temp dir are not allowed")

    return hook


class _OutOfTime(BaseException):  # not an Exception: `except Exception` in the code under test must not eat it
    pass


def _run_tests(namespace: dict, steps: list, marker: str, deadline: float) -> None:
    """Run the test steps against the user's namespace and print the one result line; exit without cleanup."""
    write, monotonic, passed = os.write, time.monotonic, []

    def out_of_time(signum, frame):
        raise _OutOfTime("the test took longer than its share of the time limit")

    left = sum(counted for _, counted in steps)
    for source, counted in steps:
        # Each test gets an equal share of the time left, so one endless test does not sink the others.
        signal.signal(signal.SIGALRM, out_of_time)
        signal.setitimer(signal.ITIMER_REAL, max(0.05, (deadline - monotonic()) / max(left, 1)))
        try:
            try:
                exec(compile(source, "<test>", "exec"), namespace)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            ok = True
        except BaseException:  # SystemExit and KeyboardInterrupt from the code under test are failures too
            ok = False
        if counted:
            passed.append(ok)
            left -= 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    line = '{"passed": [' + ", ".join("true" if ok else "false" for ok in passed) + "]}"
    write(1, f"\n{marker}{line}\n".encode())
    os._exit(0)  # no atexit handlers or thread joins of the user's: they could hang or print after us


def _child_main() -> None:
    start = time.monotonic()
    job = json.loads(sys.stdin.buffer.read())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # the job (and its marker) can no longer be read back from stdin
    os.close(null)
    _lock_down(job)
    module = type(sys)("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module  # the user's code runs as __main__, not in this module's globals
    sys.argv = ["main.py"]
    with open("main.py", encoding="utf-8") as f:
        code = compile(f.read(), "main.py", "exec")
    exec(code, module.__dict__)
    if "steps" in job:
        _run_tests(module.__dict__, job["steps"], job["marker"], start + 0.8 * job["timeout"])


if __name__ == "__main__":
    _child_main()
