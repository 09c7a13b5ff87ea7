"""Start a training stage as its own process and wait for it.

The driver (Hydra) never trains in its own process: it freezes the stage's settings into a JSON file and starts
`python -m posttrain.train.<stage> FILE`. The child's output goes to the stage's log file and to the terminal;
if the child fails, the stage fails with the end of the log in the error. If the driver dies, the kernel ends
the child too (PR_SET_PDEATHSIG), so a killed run leaves no orphan trainer writing into the run directory.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from posttrain.errors import PosttrainError

LAUNCHERS = ("direct",)


class StageFailed(PosttrainError):
    pass


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the child may outlive a killed driver
        pass


def command(module: str, config_path: Path, launch: dict) -> list[str]:
    if launch["launcher"] not in LAUNCHERS:
        raise PosttrainError(f"launch.launcher must be one of {LAUNCHERS}, not {launch['launcher']!r}")
    return [sys.executable, "-m", module, str(config_path)]


def run_training(module: str, settings: dict, work_dir: Path, launch: dict, log_name: str = "train.log") -> None:
    """Freeze `settings` to `work_dir/train_config.json`, run `module` on it, stream its output into
    `work_dir/<log_name>` (appended, so a resumed stage keeps the first attempt's log) and to stderr."""
    config_path = work_dir / "train_config.json"
    config_path.write_text(json.dumps(settings, indent=2, sort_keys=True))
    cmd = command(module, config_path, launch)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tail: deque[bytes] = deque(maxlen=64)  # last chunks of output, for the error message
    with open(work_dir / log_name, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        assert proc.stdout is not None
        # Chunks, not lines: progress bars redraw with \r and would otherwise show only when they finish.
        for chunk in iter(lambda: os.read(proc.stdout.fileno(), 1 << 16), b""):
            log.write(chunk)
            log.flush()
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail.append(chunk)
        code = proc.wait()
    if code != 0:
        last = b"".join(tail).decode(errors="replace").replace("\r", "\n").splitlines()[-30:]
        raise StageFailed(
            f"{module} exited with code {code}; log: {work_dir / log_name}\n--- last lines ---\n" + "\n".join(last)
        )
