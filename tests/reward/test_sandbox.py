"""Tests for the code-execution sandbox: scoring, judging outside the sandbox, and hostile code that must fail
fast, see nothing of the host and leave the machine as it was.

Kernel-level cases only ever try one fork/write/connect, never a loop. Every run here goes through bwrap: a
machine where it cannot run fails `test_the_sandbox_runs_here` with bwrap's reason.
"""

import doctest
import json
import os
import select
import socket
import time

import pytest

import reward.sandbox
from reward.protocol import Reward
from reward.sandbox import CodeExecution, SandboxUnavailable, _remove, extract_code, run_python

MARGIN = 2.0  # seconds over the time limit a run may take: start-up, kill and clean-up on a busy machine
ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'"]


def score(response: str, tests, timeout: float = 5.0, memory_mb: int = 512) -> tuple[float, float]:
    start = time.monotonic()
    value = CodeExecution(timeout=timeout, memory_mb=memory_mb)([{"prompt_id": "p", "tests": tests}], [response])[0]
    return value, time.monotonic() - start


def python(code: str) -> str:
    return f"```python\n{code}\n```"


def our_children() -> list[int]:
    """Processes whose parent is this test process (a surviving sandbox would be one), less the training fork
    server an earlier test of the session started (posttrain/train/forkserver.py), which outlives stages."""
    from posttrain.train import forkserver

    server = forkserver._server.proc.pid if forkserver._server is not None else None
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid() and int(pid) != server:
                    pids.append(int(pid))
        except (OSError, IndexError, ValueError):
            pass
    return pids


def test_the_sandbox_runs_here():
    assert reward.sandbox.sandbox_problem() is None


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
        python("def add(a, b):\n    return a + b if isinstance(a, int) else None"),  # 2 of 3
        python("def add(a, b)\n    return a + b"),  # syntax error
        python("raise RuntimeError('boom')\ndef add(a, b):\n    return a + b"),  # fails at import
        "I cannot write this function.",
        ADD,
    ]
    start = time.monotonic()
    assert CodeExecution()(prompts, responses) == [1.0, pytest.approx(2 / 3), 0.0, 0.0, 0.0, None]
    assert time.monotonic() - start < 5


def test_every_failure_has_a_reason():
    verdict = CodeExecution().judge(ADD_TESTS + ["assert add(1, 2) < 0", "assert sub(1, 2) == -1"], ADD)
    assert verdict.passed == [True, True, True, False, False]
    assert verdict.reasons[3] == "assertion failed" and "NameError" in verdict.reasons[4]
    broken = CodeExecution().judge(ADD_TESTS, python("def add(a, b)\n    return a"))
    assert broken.score == 0.0 and all("SyntaxError" in reason for reason in broken.reasons)
    slow = CodeExecution(timeout=1.0).judge(ADD_TESTS, python("while True:\n    pass"))
    assert slow.score == 0.0 and all(reason.startswith("timed out") for reason in slow.reasons)


def test_comparisons_are_judged_with_python_semantics():
    code = python("def f(x):\n    return x")
    tests = ["assert f((1, 2)) == (1, 2)", "assert f([1, 2]) != (1, 2)", "assert f(1) == 1.0", "assert 3 == f(3)",
             "assert f(None) is None", "assert f(2) in [1, 2]", "assert f(0.5) < 1", "assert f({1: 'a'}) == {1: 'a'}",
             "assert f(float('nan')) != 0.0", "assert f(b'x') == b'x'", "assert f({1, 2}) == {2, 1}",
             "assert f(10**30) == 10**30", "assert f('a') == 'b'", "assert f([1]) == (1,)", "assert f(1) is False"]
    verdict = CodeExecution().judge(tests, code)
    assert verdict.passed == [True] * 12 + [False] * 3


def test_test_code_as_one_string():
    tests = (
        "import math\n\ndef near(x, y):\n    return math.isclose(x, y)\n\n"  # setup, not a test
        "assert near(add(0.1, 0.2), 0.3)\nassert add(1, 1) == 3\n"
    )
    assert score(ADD, tests)[0] == 0.5
    humaneval = "def check(candidate):\n    assert candidate(2, 2) == 4\n\ncheck(add)\n"
    assert score(ADD, humaneval)[0] == 1.0


def test_stdin_stdout_cases_are_compared_outside():
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2", "output": "4  \n\n"},
             {"input": "2 3", "output": "6"}]
    program = "a, b = map(int, input().split())\nprint(a + b)"
    verdict = CodeExecution().judge(cases, python(program))
    assert verdict.passed == [True, True, False] and verdict.reasons[2] == "wrong output"
    assert CodeExecution().judge(cases, python("import sys\nsys.exit(1)")).score == 0.0


# --- tests that a policy could game ------------------------------------------------------------------------------

CHEATS = {
    "always-equal object": "class Any:\n    def __eq__(self, other):\n        return True\n"
                           "    __ne__ = __lt__ = __gt__ = __le__ = __ge__ = __eq__\n    def __hash__(self):\n"
                           "        return 0\ndef add(a, b):\n    return Any()",
    "int subclass equal to all": "class Int(int):\n    def __eq__(self, other):\n        return True\n"
                                 "def add(a, b):\n    return Int(7)",
    "builtins.exec replaced": "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
                              "builtins.eval = lambda *a, **k: None\ndef add(a, b):\n    return None",
    "os.write patched": "import os\n_write = os.write\n"
                        "def fake(fd, data):\n    return _write(fd, data.replace(b'false', b'true'))\n"
                        "os.write = fake\ndef add(a, b):\n    return None",
    "results forged": "import os, json\nfor fd in range(3, 64):\n    for i in range(3):\n        try:\n"
                      "            os.write(fd, (json.dumps({'step': i, 'ok': True}) + '\\n').encode())\n"
                      "        except OSError:\n            pass\ndef add(a, b):\n    return None",
    "frames walked": "import sys\ndef add(a, b):\n    frame = sys._getframe(1)\n    while frame:\n"
                     "        frame.f_locals.clear()\n        frame = frame.f_back\n    return 0",
    "exits before the tests": "import os\nos._exit(0)",
    "sys.exit": "import sys\nsys.exit(0)",
    "prints fake results": "print('{\"step\": 0, \"ok\": true}')\nprint('{\"passed\": [true, true, true]}')\n"
                           "def add(a, b):\n    return None",
}


@pytest.mark.parametrize("cheat", list(CHEATS))
def test_cheating_code_scores_zero(cheat):
    assert score(python(CHEATS[cheat]), ADD_TESTS)[0] == 0.0


def test_the_sandbox_never_sees_the_expected_value():
    spy = python("import sys\ndef add(a, b):\n    print(sys.stdin.read(), open('/proc/self/cmdline').read())\n"
                 "    return 0")
    result = CodeExecution().judge(["assert add(1, 2) == 31337"], spy)
    assert result.score == 0.0
    job = {"code": "import sys\nprint(sys.stdin.read())", "steps": [("add(1, 2)", "value")]}
    assert "31337" not in reward.sandbox._execute(job, 5.0, 512, 10, 0, 64, False)[0].stdout


def test_a_half_right_answer_still_counts_when_it_prints_fake_results():
    half = python("def add(a, b):\n    return a + b if a != 1 else 0\nprint('{\"step\": 0, \"ok\": true}')")
    assert score(half, ["assert add(1, 2) == 3", "assert add(2, 2) == 4"])[0] == 0.5


# --- hostile code: resources -------------------------------------------------------------------------------------

def test_an_endless_test_fails_alone():
    tests = ["assert add(1, 1) == 2", "while True: pass", "assert add(2, 2) == 4"]
    value, seconds = score(ADD, tests, timeout=2.0)
    assert value == pytest.approx(2 / 3)
    assert seconds < 2.0 + MARGIN


def test_infinite_loop_times_out_and_nothing_survives():
    value, seconds = score(python("while True:\n    pass"), ADD_TESTS, timeout=1.0)
    assert value == 0.0 and seconds < 1.0 + MARGIN
    result = run_python("while True: pass", timeout=1.0)
    assert result.timed_out and result.returncode == -9 and result.seconds < 1.0 + MARGIN
    assert our_children() == []


@pytest.mark.parametrize(
    "code", ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append([0] * 10**6)"], ids=["big", "growing"]
)
def test_memory_bomb_fails_fast(code):
    value, seconds = score(python(code), ADD_TESTS, timeout=3.0, memory_mb=256)
    assert value == 0.0 and seconds < 3.0 + MARGIN
    result = run_python(code, timeout=3.0, memory_mb=128)
    assert "MemoryError" in result.stderr and not result.timed_out
    assert run_python("print('still fine')").stdout == "still fine\n"


def test_fork_bomb_is_stopped_at_the_first_fork():
    bomb = "import os\nwhile True:\n    os.fork()"
    value, seconds = score(python(bomb), ADD_TESTS, timeout=2.0)
    assert value == 0.0 and seconds < 2.0 + MARGIN
    result = run_python(bomb, timeout=2.0)
    assert "PermissionError: [Errno 1]" in result.stderr and not result.timed_out and our_children() == []
    for escape in ("import subprocess\nsubprocess.run(['true'])", "import os\nexit(os.system('true') != 0)",
                   "import ctypes\nctypes.CDLL(None).fork() < 0 and exit(1)"):
        assert run_python(escape, timeout=2.0).returncode != 0, escape
    threads = "import threading\nt = threading.Thread(target=print, args=('threads work',))\nt.start()\nt.join()"
    assert run_python(threads, max_procs=None).stdout == "threads work\n"


def test_output_flood_is_capped():
    result = run_python("while True:\n    print('x' * 1000)", timeout=5.0, max_file_mb=1)
    # Python ignores SIGXFSZ, so the write fails with EFBIG instead and the run ends with an error.
    assert not result.timed_out and result.returncode != 0 and "File too large" in result.stderr
    assert len(result.stdout) <= 1 << 20


def test_the_work_dir_is_a_small_tmpfs():
    fill = ("import os\nn = 0\ntry:\n    for i in range(200):\n        with open(f'f{i}', 'wb') as f:\n"
            "            f.write(b'x' * (5 << 20))\n        n += 1\nexcept OSError as e:\n    print(n, e.errno)")
    assert run_python(fill, disk_mb=16, timeout=10.0).stdout.split() == ["3", "28"]  # ENOSPC at 16 MB


def test_a_deep_tree_scores_zero_and_the_batch_goes_on():
    deep = "import os\nfor i in range(1500):\n    os.mkdir('d')\n    os.chdir('d')\nos.chmod('.', 0)"
    responses = [python(deep + "\ndef add(a, b):\n    return None"), ADD]
    prompts = [{"prompt_id": str(i), "tests": ADD_TESTS} for i in range(2)]
    assert CodeExecution()(prompts, responses) == [0.0, 1.0]


def test_cleanup_of_a_hostile_host_folder_never_raises(tmp_path):
    path = tmp_path / "root"
    os.mkdir(path)
    here = os.getcwd()
    try:
        os.chdir(path)
        for _ in range(1500):
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(here)
    os.chmod(path / "d", 0)
    _remove(str(path))
    _remove(str(tmp_path / "missing"))
    assert not path.exists()


# --- hostile code: isolation -------------------------------------------------------------------------------------

def test_no_capabilities_no_devices_no_parent_environment(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    probe = (
        "import os, json\nout = {'caps': open('/proc/self/status').read().split('CapEff:')[1].split()[0]}\n"
        "out['environ'] = dict(os.environ)\nout['pid1'] = open('/proc/1/environ').read()\n"
        "out['pids'] = sorted(p for p in os.listdir('/proc') if p.isdigit())\nout['root'] = sorted(os.listdir('/'))\n"
        "def attempt(name, f):\n    try:\n        f()\n        out[name] = 'done'\n    except OSError as e:\n"
        "        out[name] = e.errno\n"
        "attempt('mknod', lambda: os.mknod('sda', 0o600 | 0o060000, os.makedev(8, 0)))\n"
        "attempt('chroot', lambda: os.chroot('.'))\n"
        "import socket\nattempt('sethostname', lambda: socket.sethostname('x'))\n"
        "attempt('nice', lambda: os.nice(-5))\n"
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def unshare():\n    if libc.unshare(0x10000000) != 0:\n        raise OSError(ctypes.get_errno(), 'unshare')\n"
        "attempt('unshare', unshare)\n"
        "attempt('stdlib', lambda: open(os.__file__, 'a'))\n"
        "attempt('etc', lambda: open('/etc/passwd'))\n"
        "attempt('tty', lambda: os.open('/dev/tty', os.O_RDWR))\n"
        "print(json.dumps(out))"
    )
    result = run_python(probe)
    out = json.loads(result.stdout)
    assert out["caps"] == "0000000000000000"
    assert out["environ"] in ({}, {"PWD": "/work"}) and "hunter2" not in result.stdout and out["pid1"] == ""
    assert len(out["pids"]) <= 3  # bwrap's init, the harness, maybe /proc/self's reader
    assert out["root"] == sorted(["dev", "proc", "posttrain", "work"] + [p for p in out["root"] if p not in
                                                                          ("dev", "proc", "posttrain", "work")])
    assert not {"etc", "home", "tmp", "var"} & set(out["root"])
    assert out["mknod"] == 1 and out["chroot"] == 1 and out["sethostname"] == 1 and out["nice"] in (1, 13)
    assert out["unshare"] in (1, 28) and out["stdlib"] == 30 and out["etc"] == 2 and out["tty"] != "done"


def test_nothing_outside_is_writable_or_even_visible(tmp_path):
    target = tmp_path / "keep.txt"
    target.write_text("original")
    attempts = [f"open({str(target)!r}, 'a').write('changed')", f"os.remove({str(target)!r})",
                f"os.chmod({str(target)!r}, 0o777)", "open('/tmp/posttrain_escape', 'w')"]
    code = "import os\n" + "".join(f"try:\n    {a}\n    print({a!r})\nexcept OSError:\n    pass\n" for a in attempts)
    assert run_python(code).stdout == ""
    assert target.read_text() == "original" and target.stat().st_mode & 0o777 != 0o777
    assert not os.path.exists("/tmp/posttrain_escape")
    assert run_python("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())").stdout == "ok\n"


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def test_network_is_refused(listener):
    port = listener.getsockname()[1]
    connect = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')\n"
    value, seconds = score(python(connect), ADD_TESTS)
    assert value == 0.0 and seconds < 5.0 + MARGIN
    result = run_python(connect)
    assert result.returncode != 0 and "connected" not in result.stdout
    assert select.select([listener], [], [], 0.2)[0] == []  # nothing ever knocked


# --- where bwrap cannot run --------------------------------------------------------------------------------------

@pytest.fixture
def no_bwrap(monkeypatch):
    monkeypatch.setattr(reward.sandbox, "_isolation", lambda: (None, "no bwrap found (test)"))


def test_refused_without_bwrap_unless_allowed(no_bwrap):
    with pytest.raises(SandboxUnavailable, match=r"no bwrap found \(test\).*allow_unsandboxed: true"):
        CodeExecution()
    with pytest.raises(SandboxUnavailable, match="allow_unsandboxed"):
        run_python("print(1)")
    unsandboxed = CodeExecution(allow_unsandboxed=True)
    prompts = [{"prompt_id": str(i), "tests": ADD_TESTS} for i in range(2)]
    assert unsandboxed(prompts, [ADD, python(CHEATS["always-equal object"])]) == [1.0, 0.0]
    environ = run_python("import os\nprint(sorted(os.environ))", allow_unsandboxed=True).stdout
    assert environ in ("[]\n", "['LC_CTYPE']\n")  # Python's own UTF-8 locale coercion (PEP 538) at most


def test_subclasses_of_built_in_types_are_judged_as_their_base_type():
    code = python("from collections import Counter, OrderedDict, namedtuple\nPoint = namedtuple('Point', 'x y')\n"
                  "def freq(s):\n    return Counter(s)\ndef ordered():\n    return OrderedDict(a=1)\n"
                  "def point():\n    return Point(1, 2)")
    tests = ["assert freq('aab') == {'a': 2, 'b': 1}", "assert ordered() == {'a': 1}", "assert point() == (1, 2)",
             "assert freq('a') == {'a': 2}"]
    assert CodeExecution().judge(tests, code).passed == [True, True, True, False]


def test_a_loop_of_asserts_in_test_code_counts():
    tests = "assert f(0) == 0\nfor i in range(5):\n    assert f(i) == i * i\n"
    assert score(python("def f(x):\n    return 0"), tests)[0] == 0.5
    assert score(python("def f(x):\n    return x * x"), tests)[0] == 1.0


def test_threads_work_in_code_rewards():
    threaded = python("import threading\ndef add(a, b):\n    out = []\n"
                      "    t = threading.Thread(target=lambda: out.append(a + b))\n    t.start()\n    t.join()\n"
                      "    return out[0]")
    assert score(threaded, ADD_TESTS)[0] == 1.0
