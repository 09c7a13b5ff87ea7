"""Training processes forked from a server that imported the training libraries once (`launch.preload`).

A training process of the direct launcher spends ~7 s on a small CPU importing torch, transformers, peft, datasets
and TRL before its first step, at every stage and every seed. With `launch.preload` (the default), on a machine
without GPU devices (CUDA does not survive a fork; a GPU stage's minutes dwarf its imports), the driver starts
one server process at the beginning of a run, `python -m posttrain.train.forkserver FD`, which imports `PRELOAD`
while the driver validates the recipe, then waits. Each training stage asks it for a process: the server forks,
and the fork becomes `python -m <module> CONFIG` (runpy, `__main__`, `sys.argv`) with the stage's environment,
working directory and output (the stage's log), as the subprocess it replaces would. The fork's `OMP_NUM_THREADS`
is applied with `torch.set_num_threads` (OpenMP read the server's value at import).

What stays as it was: the stage runs in a process of its own, never in the driver; its output, exit code and
failure message are the same; a driver that dies takes the server with it and the server its fork (both ask the
kernel, PR_SET_PDEATHSIG), so no trainer outlives a killed run. The server imports third-party libraries only
(nothing of posttrain's or the user's, which the fork imports fresh) and is replaced when a variable libraries read
at import changes in the driver (`IMPORT_TIME`: HF_*, TRANSFORMERS_*, TORCH_*...; a test's monkeypatch, say).
Unlike `multiprocessing`'s forkserver, the fork never re-imports the driver's `__main__`: a user's script without
an `if __name__ == "__main__"` guard works as before.

The protocol: one SOCK_SEQPACKET socket pair; a request is one JSON message (module, config, env, cwd) carrying the
output's file descriptor (and the driver's stdin); the server answers {"pid"} when forked and {"code"} when the fork
ended (the exit code, or minus the signal that ended it). One request at a time: the driver runs its stages one
after another. A driver interrupted mid-stage (or a server that failed) discards the server, its fork with it.
At its end the fork does what the interpreter does at exit (joins the stage's threads, runs the exit hooks,
flushes), then leaves with os._exit.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

PRELOAD = ["torch", "transformers", "transformers.trainer", "datasets", "accelerate", "peft",
           "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "trl.trainer.reward_trainer"]
_MESSAGE = 1 << 20  # the largest message: a request carries the stage's environment
# Variables libraries read when they are imported (the server's imports keep the values it started with), less those
# each fork applies itself
IMPORT_TIME = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DATASETS_", "TOKENIZERS_", "ACCELERATE_", "TRL_", "PEFT_",
               "TORCH_", "PYTORCH_", "CUDA_", "NCCL_", "MKL_", "OMP_", "DS_", "PYTHON", "LD_", "TQDM_", "XDG_", "HOME")
PER_FORK = ("PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONIOENCODING", "OMP_NUM_THREADS",
            "PYTORCH_NVML_BASED_CUDA_CHECK")  # the last set by a library in the driver mid-run; CPU machines only


def import_env() -> dict:
    """This process's variables in `IMPORT_TIME`, less `PER_FORK`: a server started under others is replaced."""
    return {k: v for k, v in os.environ.items() if k.startswith(IMPORT_TIME) and k not in PER_FORK}


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the child may outlive a killed driver
        pass


class _Server:
    def __init__(self) -> None:
        self.env = import_env()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self.proc = subprocess.Popen([sys.executable, "-m", "posttrain.train.forkserver", str(theirs.fileno())],
                                         pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         preexec_fn=die_with_parent)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()  # idle, or still importing: nothing of a run's is lost
        self.proc.wait()


_server: _Server | None = None


def usable(launch: dict) -> bool:
    """Whether a stage launched as `launch` (LaunchConfig fields) forks from the server: the direct launcher with
    `preload` on, on a machine without GPU devices (CUDA does not survive a fork, and a GPU stage's minutes dwarf
    its imports)."""
    gpu = any(Path(dev).exists() for dev in ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg"))
    return getattr(launch.get("launcher"), "name", launch.get("launcher")) == "direct" and \
        bool(launch.get("preload", True)) and not gpu


def start() -> None:
    """Have a server running that started under this process's `import_env()` (starting one returns at once; it
    imports in the background)."""
    global _server
    if _server is not None and (_server.env != import_env() or not _server.alive()):
        if _server.alive():
            now = import_env()
            changed = sorted(k for k in {*now, *_server.env} if now.get(k) != _server.env.get(k))
            print(f"posttrain: the fork server starts again: {', '.join(changed)} changed", file=sys.stderr)
        _server.close()
        _server = None
    if _server is None:
        _server = _Server()


def run(module: str, config_path, env: dict, relay) -> int:
    """Run `python -m module config_path` as a fork of the server, with `env` and this process's working directory;
    its stdout and stderr go to `relay(fd)` (which reads the fd to its end). Returns the exit code (negative: the
    signal that ended it). If this process is interrupted meanwhile, the fork is killed."""
    global _server
    # the driver's stdin too, as a subprocess inherits it (a breakpoint() in a trainer reads it); decided before
    # any descriptor of ours could take the number 0 of a stdin the driver started without
    stdin = [0] if sys.stdin is not None and _usable(0) else []
    start()
    assert _server is not None
    read, write = os.pipe()
    pid = None
    try:
        request = {"module": module, "config": str(config_path), "env": env, "cwd": os.getcwd()}
        socket.send_fds(_server.sock, [json.dumps(request).encode()], [write, *stdin])
        os.close(write)  # the fork holds the only write end: the pipe ends when the fork does
        write = -1
        pid = _answer()["pid"]
        relay(read)
        return _answer()["code"]
    except BaseException:
        # Interrupted, or the server failed: the fork is killed, and the server goes too (the fork with it, should
        # it not be forked yet); the next stage starts a new one rather than read this one's answers out of step
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        server, _server = _server, None
        server.close()
        raise
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def _usable(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _answer() -> dict:
    assert _server is not None
    message = _server.sock.recv(_MESSAGE)
    if not message:
        raise RuntimeError(f"posttrain's fork server (pid {_server.proc.pid}) ended; exit code {_server.proc.poll()}")
    return json.loads(message)


# ---- the server process -------------------------------------------------------------------------------------


def serve(fd: int) -> None:
    die_with_parent()  # the driver's death ends the server
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the fork and the driver; the server reports it
    sock = socket.socket(fileno=fd)
    # the installation's part of the path: without the server's directory and PYTHONPATH, which the fork replaces
    own = _python_path(os.environ)
    base_path = [p for p in sys.path[1:] if p not in own]
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:  # a library this install lacks: the fork imports what it needs itself
            pass
    while True:
        message, fds, _, _ = socket.recv_fds(sock, _MESSAGE, 2)
        if not message:  # the driver closed its end, or died
            return
        request = json.loads(message)
        sys.stdout.flush()
        sys.stderr.flush()
        ctypes.CDLL(None).fflush(None)  # nothing of the server's buffered output is written again by the fork
        server = os.getpid()
        pid = os.fork()
        if pid == 0:
            sock.close()
            die_with_parent()  # the server's death (it follows the driver's) ends this process
            if os.getppid() != server:  # it died before the line above
                os._exit(1)
            _become(request, fds, base_path)  # never returns
        for each in fds:
            os.close(each)
        sock.send(json.dumps({"pid": pid}).encode())
        _, status = os.waitpid(pid, 0)
        sock.send(json.dumps({"code": os.waitstatus_to_exitcode(status)}).encode())


def _python_path(env) -> list[str]:
    return [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def _become(request: dict, fds: list[int], base_path: list[str]) -> None:
    """In the fork: `python -m module config` with the request's environment, directory, output (`fds[0]`) and
    stdin (`fds[1]`, when sent); exits."""
    import atexit
    import codecs
    import io
    import runpy
    import threading
    import traceback

    code, interrupted = 1, False
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        out, *stdin = fds
        for fd in (1, 2):
            os.dup2(out, fd)
        os.close(out)
        if stdin:
            os.dup2(stdin[0], 0)
            os.close(stdin[0])
        env = request["env"]
        # unbuffered, as PYTHONUNBUFFERED makes a subprocess's streams, in PYTHONIOENCODING's "encoding:errors"
        encoding, _, errors = env.get("PYTHONIOENCODING", "").partition(":")
        encoding = codecs.lookup(encoding).name if encoding else None  # named as the interpreter names it
        if stdin and (encoding or errors):  # the driver's, sent above
            sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding=encoding, errors=errors or None)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True,
                                      encoding=encoding, errors=errors or None)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True,
                                      encoding=encoding, errors="backslashreplace")
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(env)
        # the path a fresh `python -m` starts with: the working directory, PYTHONPATH, then the installation's
        sys.path[:] = [request["cwd"], *_python_path(env), *base_path]
        if env.get("OMP_NUM_THREADS", "").isdigit():  # OpenMP read the server's value when torch was imported
            import torch

            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        sys.argv = [request["module"], request["config"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:  # as the interpreter treats it
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # as the interpreter does: the traceback, then death by SIGINT (exit code -2)
        code, interrupted = 128 + signal.SIGINT, True  # 130 if the signal cannot end it, as CPython
        traceback.print_exc()
    except BaseException:  # noqa: BLE001 - reported as a `python -m` run reports it
        traceback.print_exc()
    finally:
        # what the interpreter does at exit, which a fork leaving with os._exit skips: the stage's own non-daemon
        # threads (a tracker's uploads) end, the exit hooks run, Python's and C's buffers are flushed
        for step in (threading._shutdown, atexit._run_exitfuncs, sys.stdout.flush, sys.stderr.flush,
                     lambda: ctypes.CDLL(None).fflush(None)):
            try:
                step()
            except BaseException:  # noqa: BLE001 - each step runs whatever the one before did
                pass
        if interrupted:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
