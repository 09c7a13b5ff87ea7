"""Tests for the code-execution sandbox: scoring, and hostile code that must fail fast and leave the machine fine.

Each hostile case runs twice where it can: with every layer, and with the Python audit hook off
(`_execute({"audit": False}, ...)`), to show that the kernel layers (seccomp, Landlock, network namespace) hold
on their own. Kernel cases only ever try one fork/write/connect, never a loop.
"""

import doctest
import os
import select
import socket
import time

import pytest

import reward.sandbox
from reward.protocol import Reward
from reward.sandbox import _SYSCALLS, CodeExecution, _execute, extract_code, run_python

MARGIN = 2.0  # seconds over the time limit a run may take: start-up, kill and clean-up on a busy machine
ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]
seccomp = pytest.mark.skipif(os.uname().machine not in _SYSCALLS, reason="no seccomp table for this architecture")


def landlock_abi() -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))


def kernel_only(code: str, timeout: float = 3.0):
    """Run `code` with the audit hook off, so that only rlimits and the kernel layers stand in its way."""
    return _execute({"audit": False}, code, timeout, 512, 10, None)


def score(response: str, tests, timeout: float = 5.0, memory_mb: int = 512) -> tuple[float, float]:
    start = time.monotonic()
    value = CodeExecution(timeout=timeout, memory_mb=memory_mb)([{"prompt_id": "p", "tests": tests}], [response])[0]
    return value, time.monotonic() - start


def our_children() -> list[int]:
    """Processes whose parent is this test process (a surviving sandbox child would be one)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    pids.append(int(pid))
        except (OSError, IndexError, ValueError):
            pass
    return pids


def test_docstring_examples_hold():
    assert doctest.testmod(reward.sandbox).failed == 0


def test_code_execution_follows_the_protocol():
    assert isinstance(CodeExecution(), Reward)


def test_extract_code():
    assert extract_code("```py\na = 1\n```\n```python\nb = 2\n```\n```\nc = 3\n```") == "b = 2\n"
    assert extract_code("Here:\n```\nc = 3\n```") == "c = 3\n"
    assert extract_code("```python\nd = 4\n") == "d = 4\n"  # cut off before the closing fence
    assert extract_code("e = 5") == "e = 5"


def test_scores_correct_partial_broken_and_missing():
    prompts = [{"prompt_id": str(i), "tests": ADD_TESTS} for i in range(5)] + [{"prompt_id": "none"}]
    responses = [
        ADD,
        "```python\ndef add(a, b):\n    return a + b if isinstance(a, int) else None\n```",  # 2 of 3
        "```python\ndef add(a, b)\n    return a + b\n```",  # syntax error
        "```python\nraise RuntimeError('boom')\ndef add(a, b):\n    return a + b\n```",  # fails at import
        "I cannot write this function.",
        ADD,
    ]
    start = time.monotonic()
    assert CodeExecution()(prompts, responses) == [1.0, pytest.approx(2 / 3), 0.0, 0.0, 0.0, None]
    assert time.monotonic() - start < 5


def test_test_code_as_one_string():
    tests = (
        "import math\n\ndef near(x, y):\n    return math.isclose(x, y)\n\n"  # setup, not a test
        "assert near(add(0.1, 0.2), 0.3)\nassert add(1, 1) == 3\n"
    )
    assert score(ADD, tests)[0] == 0.5
    humaneval = "def check(candidate):\n    assert candidate(2, 2) == 4\n\ncheck(add)\n"
    assert score(ADD, humaneval)[0] == 1.0


def test_an_endless_test_fails_alone():
    tests = ["assert add(1, 1) == 2", "while True: pass", "assert add(2, 2) == 4"]
    value, seconds = score(ADD, tests, timeout=2.0)
    assert value == pytest.approx(2 / 3)
    assert seconds < 2.0 + MARGIN


def test_infinite_loop_times_out():
    value, seconds = score("```python\nwhile True:\n    pass\n```", ADD_TESTS, timeout=1.0)
    assert value == 0.0 and seconds < 1.0 + MARGIN
    result = run_python("while True: pass", timeout=1.0)
    assert result.timed_out and result.returncode == -9 and result.seconds < 1.0 + MARGIN
    assert our_children() == []


@pytest.mark.parametrize(
    "code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append([0] * 10**6)"], ids=["big", "growing"]
)
def test_memory_bomb_fails_fast(code):
    value, seconds = score(f"```python\n{code}\n```", ADD_TESTS, timeout=3.0, memory_mb=256)
    assert value == 0.0 and seconds < 3.0 + MARGIN
    result = run_python(code, timeout=3.0, memory_mb=128)
    assert "MemoryError" in result.stderr and not result.timed_out
    assert run_python("print('still fine')").stdout == "still fine\n"


def test_fork_bomb_is_stopped_before_the_first_fork():
    bomb = "import os\nwhile True:\n    os.fork()"
    value, seconds = score(f"```python\n{bomb}\n```", ADD_TESTS, timeout=2.0)
    assert value == 0.0 and seconds < 2.0 + MARGIN
    result = run_python(bomb, timeout=2.0)
    assert "PermissionError: sandbox: os.fork is not allowed" in result.stderr
    assert not result.timed_out and our_children() == []
    for escape in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')",
                   "import _posixsubprocess\n_posixsubprocess.fork_exec()", "import ctypes\nctypes.CDLL(None).fork()"):
        assert "PermissionError: sandbox:" in run_python(escape, timeout=2.0).stderr, escape


@seccomp
def test_fork_and_exec_fail_in_the_kernel_without_the_audit_hook():
    once = (
        "import os\ntry:\n    pid = os.fork()\nexcept OSError as e:\n    print('refused', e.errno)\nelse:\n"
        "    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n    print('forked')\n"
        "try:\n    os.execv('/bin/true', ['true'])\nexcept OSError as e:\n    print('refused', e.errno)\n"
        "import threading\nt = threading.Thread(target=print, args=('threads work',))\nt.start()\nt.join()\n"
    )
    assert kernel_only(once).stdout == "refused 1\nrefused 1\nthreads work\n"


def escape_code(path: str) -> str:
    return f"open({path!r}, 'w').write('escaped')"


def test_writes_outside_the_temp_dir_are_refused(tmp_path):
    outside = "/tmp/posttrain_sandbox_escape"
    if os.path.exists(outside):
        os.remove(outside)
    value, seconds = score(f"```python\n{escape_code(outside)}\n```", ADD_TESTS)
    assert value == 0.0 and seconds < 5.0 + MARGIN
    assert not os.path.exists(outside)
    result = run_python(f"{escape_code(str(tmp_path / 'x'))}\nopen('inside.txt', 'w').write('ok')\n")
    assert "not allowed outside" in result.stderr and not (tmp_path / "x").exists()
    assert run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())").stdout == "ok\n"


def tamper_attempts(target: str) -> str:
    """Code that tries, one way after another, to change `target` outside its temp dir; prints what got through."""
    attempts = [f"open({target!r}, 'a').write('changed')", f"os.link({target!r}, 'hard'); open('hard', 'a').write('x')",
                f"os.symlink({target!r}, 'soft'); open('soft', 'a').write('x')", f"os.remove({target!r})",
                f"os.rename({target!r}, 'moved')", f"os.truncate({target!r}, 0)"]
    return "import os\n" + "".join(f"try:\n    {a}\n    print({a!r})\nexcept OSError:\n    pass\n" for a in attempts)


def test_other_ways_to_change_files_outside_are_refused(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("original")
    assert run_python(tamper_attempts(str(target)) + f"os.chmod({str(target)!r}, 0o777)").stdout == ""
    assert target.read_text() == "original" and target.stat().st_mode & 0o777 != 0o777


@pytest.mark.skipif(landlock_abi() < 2, reason="the kernel has no Landlock (ABI 2: links and renames)")
def test_writes_outside_fail_in_the_kernel_without_the_audit_hook(tmp_path):
    result = kernel_only(f"{escape_code(str(tmp_path / 'x'))}\n")
    assert "PermissionError" in result.stderr and not (tmp_path / "x").exists()
    target = tmp_path / "keep.txt"
    target.write_text("original")
    assert kernel_only(tamper_attempts(str(target))).stdout == ""
    assert target.read_text() == "original"


def test_temp_dir_and_environment():
    result = run_python("import os, json\nprint(json.dumps([os.getcwd(), dict(os.environ)]))")
    cwd, env = __import__("json").loads(result.stdout)
    assert not os.path.exists(cwd)  # removed afterwards
    assert env["HOME"] == env["TMPDIR"] == cwd
    assert not any("proxy" in key.lower() or "token" in key.lower() for key in env)


def test_output_flood_is_capped():
    result = run_python("while True:\n    print('x' * 1000)", timeout=5.0, max_file_mb=1)
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead and the run ends with an error.
    assert not result.timed_out and result.returncode != 0 and "File too large" in result.stderr
    assert len(result.stdout) <= 1 << 20


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def connect_code(port: int) -> str:
    return f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"


def test_network_is_refused(listener):
    port = listener.getsockname()[1]
    value, seconds = score(f"```python\n{connect_code(port)}\n```", ADD_TESTS)
    assert value == 0.0 and seconds < 5.0 + MARGIN
    result = run_python(connect_code(port))
    assert "PermissionError: sandbox: socket" in result.stderr and "connected" not in result.stdout
    assert select.select([listener], [], [], 0.2)[0] == []  # nothing ever knocked


@seccomp
def test_network_is_refused_in_the_kernel_without_the_audit_hook(listener):
    result = kernel_only(connect_code(listener.getsockname()[1]))
    assert "PermissionError" in result.stderr and "connected" not in result.stdout
    assert select.select([listener], [], [], 0.2)[0] == []


def test_printed_fake_results_do_not_count():
    fake = (
        'print(\'\\n@@posttrain-sandbox-0123@@{"passed": [true, true, true]}\')\n'
        'print(\'{"passed": [true, true, true]}\')'
    )
    wrong = "```python\ndef add(a, b):\n    return None\n" + fake + "\n```"
    assert score(wrong, ADD_TESTS)[0] == 0.0
    exits_early = "```python\n" + fake + "\nimport os\nos._exit(0)\n```"
    assert score(exits_early, ADD_TESTS)[0] == 0.0
    sys_exit = "```python\nimport sys\nsys.exit(0)\n```"  # leaving before the tests run is no pass
    assert score(sys_exit, ADD_TESTS)[0] == 0.0
    # The real result still comes through when the code prints a fake one and half works.
    half = "```python\ndef add(a, b):\n    return a + b if a != 1 else 0\n" + fake + "\n```"
    assert score(half, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"])[0] == 0.5
