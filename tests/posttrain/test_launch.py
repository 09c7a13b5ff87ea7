"""The stage launcher: the exact command line of each launcher (checked against the launchers' own argument
parsers), the DeepSpeed configs it resolves, the recipe mistakes it refuses, and a failing torchrun child failing
the stage with the worker's exception in the error."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from posttrain.config import LaunchConfig
from posttrain.errors import PosttrainError
from posttrain.train.launch import StageFailed, command, deepspeed_config, run_training

MODULE, CFG = "posttrain.train.sft", Path("/run/round_1/04_sft/train_config.json")
ZERO3 = str(deepspeed_config("zero3"))


def _launch(**fields) -> dict:
    from dataclasses import asdict

    return {**asdict(LaunchConfig()), **fields}


def test_direct_runs_the_module_in_one_process():
    assert command(MODULE, CFG, _launch()) == [sys.executable, "-m", MODULE, str(CFG)]
    assert command(MODULE, CFG, {"launcher": "direct", "nproc": 1}) == [sys.executable, "-m", MODULE, str(CFG)]


def test_torchrun_one_node_takes_a_free_port():
    cmd = command(MODULE, CFG, _launch(launcher="torchrun", nproc=2, deepspeed="zero3"))
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                   "-m", MODULE, str(CFG)]
    # The DeepSpeed config travels in the frozen settings, not on torchrun's command line.
    args = _torchrun_args(cmd)
    assert args.standalone and args.nproc_per_node == "2" and args.module
    assert (args.training_script, args.training_script_args) == (MODULE, [str(CFG)])


def test_torchrun_multi_node():
    launch = _launch(launcher="torchrun", nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1", deepspeed="zero3")
    cmd = command(MODULE, CFG, launch)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "2",
                   "--node_rank", "1", "--master_addr", "10.0.0.1", "--master_port", "29500", "-m", MODULE, str(CFG)]
    args = _torchrun_args(cmd)
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == ("2", 1, "10.0.0.1", 29500)
    assert command(MODULE, CFG, {**launch, "master_port": 6000})[-4] == "6000"


def test_accelerate_one_node_with_deepspeed():
    cmd = command(MODULE, CFG, _launch(launcher="accelerate", nproc=2, deepspeed="zero3"))
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
                   "--use_deepspeed", "--deepspeed_config_file", ZERO3, "--main_process_port", "0",
                   "-m", MODULE, str(CFG)]
    args = _accelerate_args(cmd)
    assert args.use_deepspeed and args.num_processes == 2 and args.deepspeed_config_file == ZERO3
    assert args.module and (args.training_script, args.training_script_args) == (MODULE, [str(CFG)])


def test_accelerate_multi_node_on_every_node():
    cmd = command(MODULE, CFG, _launch(launcher="accelerate", nproc=8, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                                       master_port=6000, deepspeed="zero3_offload"))
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "16", "--num_machines", "2",
                   "--use_deepspeed", "--deepspeed_config_file", str(deepspeed_config("zero3_offload")),
                   "--machine_rank", "1", "--main_process_ip", "10.0.0.1", "--main_process_port", "6000",
                   "--deepspeed_multinode_launcher", "standard", "-m", MODULE, str(CFG)]
    args = _accelerate_args(cmd)
    assert (args.num_machines, args.machine_rank, args.deepspeed_multinode_launcher) == (2, 1, "standard")


def test_accelerate_multi_node_from_a_hostfile():
    cmd = command(MODULE, CFG, _launch(launcher="accelerate", nproc=8, nnodes=4, master_addr="10.0.0.1",
                                       hostfile="/etc/ds_hostfile", deepspeed="zero3"))
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "32", "--num_machines", "4",
                   "--use_deepspeed", "--deepspeed_config_file", ZERO3, "--deepspeed_hostfile", "/etc/ds_hostfile",
                   "--deepspeed_multinode_launcher", "pdsh", "--main_process_ip", "10.0.0.1",
                   "--main_process_port", "29500", "-m", MODULE, str(CFG)]
    assert _accelerate_args(cmd).deepspeed_hostfile == "/etc/ds_hostfile"


def test_accelerate_without_deepspeed_is_plain_ddp():
    cmd = command(MODULE, CFG, _launch(launcher="accelerate", nproc=2))
    assert "--multi_gpu" in cmd and "--use_deepspeed" not in cmd


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"launcher": "mpirun"}, "launch.launcher must be one of"),
        ({"nproc": 2}, "launcher=direct starts one process"),
        ({"deepspeed": "zero3"}, "launcher=direct starts one process"),
        ({"launcher": "torchrun", "nproc": 0}, "nproc >= 1"),
        ({"launcher": "torchrun", "nnodes": 2, "node_rank": 2, "master_addr": "h"}, "node_rank < nnodes"),
        ({"launcher": "torchrun", "nnodes": 2}, "needs launch.master_addr"),
        ({"launcher": "torchrun", "nnodes": 2, "master_addr": "h", "hostfile": "f", "deepspeed": "zero3"},
         "launch.hostfile is DeepSpeed's"),
        ({"launcher": "accelerate", "nnodes": 2, "master_addr": "h", "hostfile": "f"},
         "launch.hostfile is DeepSpeed's"),
        ({"launcher": "accelerate", "deepspeed": "zero2"},
         "neither one of recipes/deepspeed/ ['zero3', 'zero3_offload']"),
    ],
)
def test_bad_launch_settings_are_refused(fields, message):
    with pytest.raises(PosttrainError, match=re.escape(message)):
        command(MODULE, CFG, _launch(**fields))


def test_deepspeed_configs_ship_with_the_recipes(tmp_path):
    for name, offload in (("zero3", False), ("zero3_offload", True)):
        path = deepspeed_config(name)
        assert path.parent.name == "deepspeed" and path.parent.parent.name == "recipes"
        ds = json.loads(path.read_text())
        zero = ds["zero_optimization"]
        assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert ("offload_param" in zero and "offload_optimizer" in zero) == offload
        # Precision and batch sizes come from the stage's settings: bf16 on GPU, fp32 on CPU.
        assert ds["bf16"]["enabled"] == "auto" and ds["train_micro_batch_size_per_gpu"] == "auto"
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert deepspeed_config(str(own)) == own


@pytest.mark.slow  # ~20 s: two workers import torch and TRL before the failure
def test_a_failing_torchrun_worker_fails_the_stage_with_its_exception(tmp_path):
    missing = tmp_path / "no-such-dataset"
    settings = {"output_dir": str(tmp_path), "data": [str(missing)], "eval_fraction": 0.1}
    launch = {"launcher": "torchrun", "nproc": 2, "deepspeed": "zero3"}
    with pytest.raises(StageFailed) as err:
        run_training("posttrain.train.sft", settings, tmp_path, launch)
    message = str(err.value)
    assert "posttrain.train.sft exited with code 1" in message and str(tmp_path / "train.log") in message
    # The worker's own exception is in the tail, not only torchrun's summary.
    assert f"FileNotFoundError: Directory {missing} not found" in message
    log = (tmp_path / "train.log").read_text()
    assert log.startswith(f"$ {sys.executable} -m torch.distributed.run --nproc_per_node 2 --standalone")
    frozen = json.loads((tmp_path / "train_config.json").read_text())
    assert frozen["deepspeed"]["zero_optimization"]["stage"] == 3  # the config the workers read


def _torchrun_args(cmd):
    from torch.distributed.run import get_args_parser

    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    return get_args_parser().parse_args(cmd[3:])


def _accelerate_args(cmd):
    from accelerate.commands.launch import launch_command_parser

    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(cmd[3:])


FAKE_TRAINER = '''
import json, sys
from pathlib import Path

import torch
from safetensors.torch import save_file

settings = json.loads(Path(sys.argv[1]).read_text())
out = Path(settings["output_dir"])
(out / "model").mkdir(parents=True, exist_ok=True)
save_file({"w": torch.full((2,), float(settings["seed"]))}, str(out / "model" / "model.safetensors"))
(out / "model" / "config.json").write_text("{}")
(out / "metrics.json").write_text(json.dumps({"train_rows": 3, "seed": settings["seed"], "dtype": settings["dtype"]}))
with open(settings["calls"], "a") as f:
    f.write(f"{settings['seed']}\\n")
'''


def test_launch_stage_trains_one_model_per_seed_and_averages_them(tmp_path, monkeypatch):
    """The driver side every training stage shares: one process per seed, each in seed_<s>/, averaged into model/;
    a seed already trained is not trained again when the stage resumes."""
    from safetensors.torch import load_file

    from posttrain.config import SFTConfig, TrainJob
    from posttrain.train.launch import launch_stage

    (tmp_path / "fake_trainer.py").write_text(FAKE_TRAINER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    calls = tmp_path / "calls.txt"
    out = tmp_path / "stage"
    out.mkdir()
    job = TrainJob(train=SFTConfig(seeds=[1, 3]), dtype="bfloat16")
    first, metrics = launch_stage("fake_trainer", job, {"calls": str(calls)}, out)
    assert first.pop("seconds")["startup"] > 0
    assert first == {"train_rows": 3, "seed": 1, "dtype": "bfloat16"}  # the frozen settings carry seed and dtype
    assert metrics["averaged_seeds"] == [1, 3] and metrics["seeds"]["3"]["seed"] == 3
    assert load_file(str(out / "model" / "model.safetensors"))["w"].tolist() == [2.0, 2.0]
    assert calls.read_text().split() == ["1", "3"]

    # A crash after seed 1 finished: only seed 3 runs again.
    import shutil

    shutil.rmtree(out / "seed_3"), shutil.rmtree(out / "model")
    launch_stage("fake_trainer", job, {"calls": str(calls)}, out)
    assert calls.read_text().split() == ["1", "3", "3"]

    single = tmp_path / "single"
    single.mkdir()
    first, metrics = launch_stage("fake_trainer", TrainJob(train=SFTConfig(), seed=7), {"calls": str(calls)}, single)
    assert first == metrics and metrics["seed"] == 7 and (single / "model" / "model.safetensors").exists()


def test_precision_follows_model_dtype():
    """`model.dtype`: auto is fp32 on this CPU machine; bfloat16 trains with bf16=True, with bf16 weights under
    DeepSpeed (which keeps fp32 master weights) and fp32 weights under autocast without it; float16 keeps fp32
    weights under fp16 autocast. The policy loads in the chosen dtype."""
    import torch

    from posttrain.train import common

    assert common.precision("auto") == (torch.float32, {"bf16": False, "fp16": False})
    assert common.precision("float32") == (torch.float32, {"bf16": False, "fp16": False})
    assert common.precision("bfloat16") == (torch.float32, {"bf16": True, "fp16": False})
    assert common.precision("bfloat16", deepspeed=True) == (torch.bfloat16, {"bf16": True, "fp16": False})
    assert common.precision("float16") == (torch.float32, {"bf16": False, "fp16": True})
    args = common.trainer_args({"learning_rate": 1e-5, "epochs": 1, "batch_size": 1, "grad_accum": 1,
                                "lr_scheduler": "constant", "warmup_ratio": 0.0, "weight_decay": 0.0,
                                "logging_steps": 1, "save_steps": 10, "report_to": ["none"], "seed": 0,
                                "dtype": "bfloat16"}, "/tmp/unused")
    assert args["bf16"] is True and args["fp16"] is False
    lora = {"enabled": False}
    model, tokenizer, _ = common.load_policy({"model": "tiny://layers=2,hidden=64,seed=0", "dtype": "bfloat16",
                                              "lora": lora, "deepspeed": {"zero_optimization": {"stage": 3}}})
    assert next(model.parameters()).dtype == torch.bfloat16 and tokenizer.pad_token is not None
    model, _, _ = common.load_policy({"model": "tiny://layers=2,hidden=64,seed=0", "dtype": "auto", "lora": lora})
    assert next(model.parameters()).dtype == torch.float32


def test_a_checkpoint_cut_short_is_passed_over(tmp_path):
    """A kill while `checkpoint-6` was written leaves it without trainer_state.json: resume from checkpoint-4."""
    from posttrain.train.common import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, state in ((2, "{}"), (4, '{"global_step": 4}'), (6, None), (8, '{"global_st')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-4"


def test_training_processes_are_named_for_trackers_and_log_into_their_stage_folder(tmp_path, monkeypatch):
    from posttrain.config import SFTConfig, TrainJob
    from posttrain.train.launch import launch_stage, run_names

    assert run_names(tmp_path / "myrun" / "round_2" / ".05_sft.partial") == ("myrun", "round_2/sft")
    assert run_names(tmp_path / "myrun" / "round_1" / ".00_rm.partial" / "seed_3") == ("myrun", "round_1/rm/seed_3")
    (tmp_path / "env_trainer.py").write_text(
        "import json, os, sys\nfrom pathlib import Path\n"
        "settings = json.loads(Path(sys.argv[1]).read_text())\nout = Path(settings['output_dir'])\n"
        "(out / 'metrics.json').write_text(json.dumps({'run_name': settings['run_name'],"
        " 'tensorboard': os.environ['TENSORBOARD_LOGGING_DIR'], 'group': os.environ['WANDB_RUN_GROUP'],"
        " 'wandb': [os.environ['WANDB_RUN_ID'], os.environ['WANDB_RESUME']], 'project': settings['run_group']}))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    for name in ("WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.delenv("WANDB_RUN_GROUP", raising=False)
    out = tmp_path / "myrun" / "round_1" / ".05_sft.partial"
    out.mkdir(parents=True)
    metrics, _ = launch_stage("env_trainer", TrainJob(train=SFTConfig(), seed=0), {}, out)
    run_id, resume = metrics.pop("wandb")
    assert metrics.pop("project") == "myrun"  # trackio's project: the run directory
    assert metrics.pop("seconds")["startup"] > 0  # the process's own time: it timed no phase of its own
    assert metrics == {"run_name": "round_1/sft", "tensorboard": str(out / "tensorboard"), "group": "myrun"}
    assert resume == "allow"  # a resumed stage continues its wandb run: the same id on every attempt
    again, _ = launch_stage("env_trainer", TrainJob(train=SFTConfig(), seed=0), {}, out)
    assert again["wandb"][0] == run_id


def test_cpu_threads_are_the_cores_this_process_may_use_shared_by_the_nodes_processes(monkeypatch, tmp_path):
    from posttrain.train.launch import DEFAULTS, stage_env, threads_per_process

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))  # a 16-core CPU set
    assert (threads_per_process(), threads_per_process(4), threads_per_process(32)) == (16, 4, 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    direct = stage_env(tmp_path, DEFAULTS, "g")
    torchrun = stage_env(tmp_path, {**DEFAULTS, "launcher": "torchrun", "nproc": 4, "deepspeed": "zero3"}, "g")
    assert (direct["OMP_NUM_THREADS"], torchrun["OMP_NUM_THREADS"]) == ("16", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what the user (or the tests) exported wins
    assert stage_env(tmp_path, DEFAULTS, "g")["OMP_NUM_THREADS"] == "1"


PROBE = '''
import os, sys
import torch
print("name", __name__, "argv", sys.argv[1:], "cwd", os.getcwd(), flush=True)
print("env", os.environ.get("PROBE_VALUE"), os.environ["TENSORBOARD_LOGGING_DIR"], "threads", torch.get_num_threads())
print("to stderr", file=sys.stderr)
print("encoding", sys.stdout.encoding, sys.stdout.errors, sys.stderr.encoding, sys.stderr.errors, sys.stdin.encoding,
      flush=True)
if os.environ.get("PROBE_INTERRUPT"):
    raise KeyboardInterrupt
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
'''


@pytest.mark.parametrize("preload", [True, False])
def test_a_forked_stage_process_is_a_python_dash_m_run(tmp_path, monkeypatch, preload):
    """launch.preload forks the stage's process from the server that imported the libraries: it sees what a fresh
    `python -m module CONFIG` would (its own `__main__`, argv, the stage's environment and working directory,
    OMP_NUM_THREADS applied), its output reaches the log, and its exit code fails the stage the same way."""
    from posttrain.train import forkserver

    forkserver.start()  # before the variables below: the fork, not the server's start, must bring them
    code, work, cwd = tmp_path / "code", tmp_path / "stage", tmp_path / "cwd"
    for folder in (code, work, cwd):
        folder.mkdir()
    (code / "probe_trainer.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(code))
    monkeypatch.setenv("PROBE_VALUE", "seen")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the tests' server imported torch with 1
    monkeypatch.setenv("PYTHONIOENCODING", "latin-1:replace")
    monkeypatch.chdir(cwd)
    launch = {"launcher": "direct", "preload": preload}
    saved, null = os.dup(0), os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)  # a stdin to hand on, wherever the tests run
    try:
        run_training("probe_trainer", {}, work, launch)
    finally:
        os.dup2(saved, 0)
        os.close(saved), os.close(null)
    log = (work / "train.log").read_text()
    assert (" (a fork of the preloaded server" in log.splitlines()[0]) is preload
    config = work / "train_config.json"
    assert f"name __main__ argv ['{config}'] cwd {cwd}\n" in log
    assert f"env seen {work / 'tensorboard'} threads 2\n" in log and "to stderr\n" in log
    assert "encoding iso8859-1 replace iso8859-1 backslashreplace iso8859-1\n" in log
    monkeypatch.setenv("PROBE_EXIT", "3")
    with pytest.raises(StageFailed, match="probe_trainer exited with code 3") as err:
        run_training("probe_trainer", {}, work, launch)
    assert "to stderr" in str(err.value)
    monkeypatch.setenv("PROBE_INTERRUPT", "1")  # a KeyboardInterrupt of its own: the traceback, death by SIGINT
    with pytest.raises(StageFailed, match="probe_trainer exited with code -2") as err:
        run_training("probe_trainer", {}, work, launch)
    assert "KeyboardInterrupt" in str(err.value)


def test_a_driver_interrupted_mid_stage_discards_the_server(tmp_path, monkeypatch):
    """Ctrl-C while a forked stage runs: the fork and its server go; the next stage gets a new server and its own
    exit code, not the old fork's."""
    from posttrain.train import forkserver

    (tmp_path / "probe_trainer.py").write_text(PROBE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PROBE_EXIT", "5")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path))  # the probe prints it

    def interrupted(fd):
        os.read(fd, 1)
        raise KeyboardInterrupt

    forkserver.start()
    server = forkserver._server
    with pytest.raises(KeyboardInterrupt):
        forkserver.run("probe_trainer", tmp_path / "c.json", dict(os.environ), interrupted)
    assert forkserver._server is None and server.proc.poll() is not None
    output = []
    assert forkserver.run("probe_trainer", tmp_path / "c.json", dict(os.environ),
                          lambda fd: output.extend(iter(lambda: os.read(fd, 1 << 16), b""))) == 5
    assert b"to stderr" in b"".join(output)


def test_a_killed_driver_leaves_no_forked_trainer(tmp_path):
    """SIGKILL the driver while a forked stage runs: the server and the stage's process die with it. The driver is
    a script without an `if __name__ == "__main__"` guard (the fork never re-imports it)."""
    import signal
    import subprocess
    import time

    (tmp_path / "sleepy_trainer.py").write_text(
        "import os, sys, time\nopen(sys.argv[1] + '.pid', 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    (tmp_path / "driver.py").write_text(
        "import sys\nfrom pathlib import Path\nfrom posttrain.train.launch import run_training\n"
        "run_training('sleepy_trainer', {}, Path(sys.argv[1]), {'launcher': 'direct'})\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    driver = subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), str(tmp_path)], env=env)
    pid_file = tmp_path / "train_config.json.pid"
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert driver.poll() is None and time.monotonic() < deadline, "the forked trainer never started"
        time.sleep(0.2)
    trainer = int(pid_file.read_text())
    assert trainer != driver.pid and _parent(trainer) != driver.pid  # a fork of the server, not of the driver
    server = _parent(trainer)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 20
    while _alive(trainer) or _alive(server):
        assert time.monotonic() < deadline, "a process outlived the killed driver"
        time.sleep(0.2)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_forked_stage_trains_the_same_model_as_a_subprocess(tmp_path):
    """The tiny model's SFT stage, forked (launch.preload, the default) and as a plain subprocess: the same
    weights to the last bit."""
    import datasets
    from safetensors.torch import load_file

    from posttrain.config import SFTConfig, TrainJob
    from posttrain.train.sft import sft_stage

    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Name a number near {i}."}],
             "text": f"{i + 1} is near {i}."} for i in range(12)]
    data = tmp_path / "generations"
    datasets.Dataset.from_list(rows).save_to_disk(str(data))
    sft = SFTConfig(learning_rate=3e-3, epochs=1, batch_size=4, max_length=64, logging_steps=1, save_steps=1000,
                    eval_fraction=0.0, lr_scheduler="constant")
    weights = {}
    for preload in (True, False):
        out = tmp_path / str(preload)
        out.mkdir()
        job = TrainJob(train=sft, seed=0, launch=LaunchConfig(preload=preload))
        sft_stage(job, {"model": "tiny://layers=2,hidden=64,seed=0", "data": [str(data)]}, out)
        weights[preload] = load_file(str(out / "model" / "model.safetensors"))
    assert weights[True].keys() == weights[False].keys()
    assert all(weights[True][k].equal(weights[False][k]) for k in weights[True])
