"""Start a training stage as its own process group and wait for it.

The driver (Hydra) never trains in its own process: it freezes the stage's settings into a JSON file and starts
`python -m posttrain.train.<stage> FILE` directly (one process), through `torchrun` or through `accelerate launch`
(`launch.launcher`), with `launch.nproc` processes on each of `launch.nnodes` machines and, when the recipe names
one, a DeepSpeed config from `recipes/deepspeed/` (`zero3`, `zero3_offload`) or a path. The config is frozen into
the settings too, so the training processes read exactly what the launcher saw; its "auto" values are filled by
the HF trainer from the stage's settings (batch sizes, clipping, bf16 on GPU, fp32 on CPU).

On a machine without GPUs the same recipe runs on CPU: DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) and the
gloo backend (posttrain/train/common.py sets that up in the training processes).

Several machines: torchrun and accelerate run on every node with its `node_rank` and the first node's
`master_addr`; or `accelerate launch` on the first node starts every node listed in a DeepSpeed `hostfile`
(pdsh). Either way the run directory must be on a filesystem all nodes share: global rank 0 writes the outputs.

`launch_stage` is the driver side every training stage shares: it freezes the stage's settings (with the model's
dtype and the seed), runs the process once, or once per seed in `<stage>.seeds` and averages their models (Llama 3
averages at every stage), and reads back the metrics the process wrote.

The children's output goes to the stage's log file and to the terminal; if they fail, the stage fails with the
end of the log in the error. If the driver dies, the kernel ends the launcher too (PR_SET_PDEATHSIG), and each
worker asks the same of its launcher (common.main), so a killed run leaves no orphan trainer writing into the run
directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path

from posttrain.config import TrainJob
from posttrain.errors import PosttrainError
from posttrain.models import release_models
from posttrain.train import forkserver
from posttrain.train.forkserver import die_with_parent

LAUNCHERS = ("direct", "torchrun", "accelerate")
DEFAULTS = {"launcher": "direct", "nproc": 1, "nnodes": 1, "node_rank": 0, "master_addr": None, "master_port": None,
            "hostfile": None, "deepspeed": None}  # posttrain.config.LaunchConfig; tests pass only a few keys


class StageFailed(PosttrainError):
    pass




def threads_per_process(processes: int = 1) -> int:
    """CPU threads for each of `processes` processes on this machine: the cores this process may run on
    (its affinity mask, which container CPU sets narrow), shared out, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes))


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def deepspeed_config(name: str) -> Path:
    """The DeepSpeed JSON a recipe names: `zero3` -> recipes/deepspeed/zero3.json in the installed `recipes`
    package, or a path to a JSON file."""
    import importlib.resources

    shipped = importlib.resources.files("recipes") / "deepspeed"
    candidate = shipped / f"{name}.json"
    if candidate.is_file():
        return Path(str(candidate))
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    names = sorted(p.name.removesuffix(".json") for p in shipped.iterdir() if p.name.endswith(".json"))
    raise PosttrainError(f"launch.deepspeed={name!r} is neither one of recipes/deepspeed/ {names} nor a JSON file")


def command(module: str, config_path: Path, launch: dict) -> list[str]:
    """The command line that runs `python -m <module> <config_path>` as `launch` (LaunchConfig fields) says."""
    launch = {**DEFAULTS, **launch}
    launcher, nproc, nnodes = launch["launcher"], launch["nproc"], launch["nnodes"]
    if launcher not in LAUNCHERS:
        raise PosttrainError(f"launch.launcher must be one of {LAUNCHERS}, not {launcher!r}")
    if nproc < 1 or nnodes < 1 or not 0 <= launch["node_rank"] < nnodes:
        raise PosttrainError(f"launch: need nproc >= 1, nnodes >= 1 and 0 <= node_rank < nnodes, got nproc={nproc}, "
                             f"nnodes={nnodes}, node_rank={launch['node_rank']}")
    script = [str(config_path)]
    if launcher == "direct":
        if nproc > 1 or nnodes > 1 or launch["deepspeed"] or launch["hostfile"]:
            raise PosttrainError("launch.launcher=direct starts one process without DeepSpeed; use torchrun or "
                                 "accelerate for nproc > 1, nnodes > 1, deepspeed or hostfile")
        return [sys.executable, "-m", module, *script]
    multinode = nnodes > 1
    if launch["hostfile"] and (launcher != "accelerate" or not launch["deepspeed"] or not multinode):
        raise PosttrainError("launch.hostfile is DeepSpeed's: it needs launcher=accelerate, a deepspeed config and "
                             "nnodes > 1 (torchrun runs on every node with its launch.node_rank instead)")
    if multinode and not launch["master_addr"]:
        raise PosttrainError("launch.nnodes > 1 needs launch.master_addr (the address of the node with rank 0)")
    port = launch["master_port"] if launch["master_port"] is not None else (29500 if multinode else None)

    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
        if port is None:  # one machine: a free port, so runs side by side do not collide
            cmd += ["--standalone"]
        else:
            cmd += ["--nnodes", str(nnodes), "--node_rank", str(launch["node_rank"]),
                    "--master_addr", launch["master_addr"] or "127.0.0.1", "--master_port", str(port)]
        return cmd + ["-m", module, *script]

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc * nnodes),
           "--num_machines", str(nnodes)]
    if launch["deepspeed"]:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(deepspeed_config(launch["deepspeed"]))]
    elif nproc * nnodes > 1:
        cmd += ["--multi_gpu"]  # accelerate's name for plain DDP; on CPU the trainer uses gloo
    if launch["hostfile"]:
        cmd += ["--deepspeed_hostfile", launch["hostfile"], "--deepspeed_multinode_launcher", "pdsh",
                "--main_process_ip", launch["master_addr"], "--main_process_port", str(port)]
    elif multinode:
        cmd += ["--machine_rank", str(launch["node_rank"]), "--main_process_ip", launch["master_addr"],
                "--main_process_port", str(port)]
        if launch["deepspeed"]:
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    else:
        cmd += ["--main_process_port", str(port if port is not None else 0)]  # 0: a free port
    return cmd + ["-m", module, *script]


def run_names(work_dir: Path) -> tuple[str, str]:
    """(the run directory's name, `round_N/stage[/seed_S]`) for a training process writing into `work_dir`: a
    stage folder (`round_1/.05_sft.partial`) or a seed folder in one."""
    from posttrain.rundir import stage_names

    seed = work_dir.name if work_dir.name.startswith("seed_") else None
    run, round_dir, stage = stage_names(work_dir.parent if seed else work_dir)
    return run or "posttrain", "/".join(part for part in (round_dir, stage, seed) if part)


def stage_env(work_dir: Path, launch: dict, group: str) -> dict:
    """The environment a training stage's processes start with: the driver's, plus (where the user exported no
    value of their own) tracker settings, DeepSpeed's CPU accelerator on a machine without GPUs, and CPU threads."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Trackers: TensorBoard events in the stage's own folder (the same one when it resumes), one wandb group per
    # run directory; runs are named round_N/stage[/seed_S] (`run_name`). A value the user exported wins.
    env.setdefault("TENSORBOARD_LOGGING_DIR", str(work_dir / "tensorboard"))
    env.setdefault("WANDB_RUN_GROUP", group)
    # A resumed stage continues its wandb run: an id stable for this run directory, stage and seed.
    env.setdefault("WANDB_RUN_ID", hashlib.sha256(str(work_dir.resolve()).replace(".partial", "").encode())
                   .hexdigest()[:16])
    env.setdefault("WANDB_RESUME", "allow")
    if launch["launcher"] != "direct" and not _has_gpu():
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator; the trainers then use gloo
    # CPU threads: the cores this process may use, shared by the node's processes (torchrun would give each 1),
    # unless OMP_NUM_THREADS says otherwise (the tests set 1)
    processes = 1 if launch["launcher"] == "direct" else launch["nproc"]
    env.setdefault("OMP_NUM_THREADS", str(threads_per_process(processes)))
    return env


def run_training(module: str, settings: dict, work_dir: Path, launch: dict, log_name: str = "train.log",
                 config_name: str = "train_config.json") -> None:
    """Freeze `settings` to `work_dir/<config_name>`, run `module` on it, stream its output into
    `work_dir/<log_name>` (appended, so a resumed stage keeps the first attempt's log) and to stderr."""
    release_models()  # the driver's kept inference model: the processes started here need the memory
    launch = {**DEFAULTS, **launch}
    config_path = work_dir / config_name
    cmd = command(module, config_path, launch)
    ds = launch["deepspeed"]
    group, name = run_names(work_dir)
    settings = {**settings, "deepspeed": json.loads(deepspeed_config(ds).read_text()) if ds else None,
                "run_name": name, "run_group": group}
    config_path.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str))
    env = stage_env(work_dir, launch, group)
    tail: deque[bytes] = deque(maxlen=64)  # last chunks of output, for the error message
    forked = forkserver.usable(launch)
    with open(work_dir / log_name, "ab") as log:
        how = "  (a fork of the preloaded server: posttrain/train/forkserver.py)" if forked else ""
        log.write(f"$ {' '.join(cmd)}{how}\n".encode())

        def relay(fd: int) -> None:
            # Chunks, not lines: progress bars redraw with \r and would otherwise show only when they finish.
            for chunk in iter(lambda: os.read(fd, 1 << 16), b""):
                log.write(chunk)
                log.flush()
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                tail.append(chunk)

        if forked:
            code = forkserver.run(module, config_path, env, relay)
        else:
            with subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent
            ) as proc:
                assert proc.stdout is not None
                relay(proc.stdout.fileno())
                code = proc.wait()
    if code != 0:
        last = b"".join(tail).decode(errors="replace").replace("\r", "\n").splitlines()[-30:]
        raise StageFailed(
            f"{module} exited with code {code}; log: {work_dir / log_name}\n--- last lines ---\n" + "\n".join(last)
        )


def launch_stage(module: str, job: TrainJob, settings: dict, out: Path) -> tuple[dict, dict]:
    """Run the training process `module` (posttrain.train.sft, .dpo, .rm) on `settings` (the stage's own keys:
    model, data, hyperparameters) as `job.launch` says, writing into `out`. With `job.train.seeds`, once per seed
    in `out/seed_<s>/` and their models averaged uniformly into `out/model/`; a seed whose model is there already
    (a resumed stage) is not trained again, one cut short resumes from its own checkpoints.

    Returns (the metrics of the first or only run, the metrics for the manifest: the same without seeds, else
    `averaged_seeds` and every seed's metrics). A run's `seconds` gain `startup`: its process's wall time not
    spent in the phases it timed itself (interpreter, imports, the launcher, distributed set-up)."""
    from posttrain.average import average_checkpoints

    launch = asdict(job.launch)
    common = {**settings, "dtype": str(job.dtype)}
    seeds = list(job.train.seeds or [])
    if not seeds:
        metrics = _timed_run(module, {**common, "seed": job.seed, "output_dir": str(out)}, out, launch)
        return metrics, metrics
    runs = {}
    for seed in seeds:
        sub = out / f"seed_{seed}"
        sub.mkdir(exist_ok=True)
        if not ((sub / "model" / "config.json").exists() and (sub / "metrics.json").exists()):
            _timed_run(module, {**common, "seed": seed, "output_dir": str(sub)}, sub, launch)
        runs[seed] = json.loads((sub / "metrics.json").read_text())
    started = time.perf_counter()
    if not (out / "model").exists():
        average_checkpoints([out / f"seed_{s}" / "model" for s in seeds], out / "model")
    return runs[seeds[0]], {"averaged_seeds": seeds, "seeds": {str(s): m for s, m in runs.items()},
                            "seconds": {"average": round(time.perf_counter() - started, 3)}}


def _timed_run(module: str, settings: dict, out: Path, launch: dict) -> dict:
    """`run_training`, then its metrics.json with `seconds.startup` added (and written back)."""
    started = time.perf_counter()
    run_training(module, settings, out, launch)
    wall = time.perf_counter() - started
    metrics = json.loads((out / "metrics.json").read_text())
    phases = metrics.get("seconds") or {}
    metrics["seconds"] = {"startup": round(max(wall - sum(phases.values()), 0.0), 3), **phases}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
