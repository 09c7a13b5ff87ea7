"""The `posttrain` command end to end, on tiny models, through real subprocesses."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

POSTTRAIN = [sys.executable, "-m", "recipes.cli"]
# Small enough to run in seconds, big enough to be killed halfway through generation and through SFT.
FAST = [
    "experiment=tiny",
    "debug=fast",  # recipes/debug/fast.yaml: 24 prompts, 32 new tokens, 4 SFT epochs with a checkpoint every 3 steps
    "generate.backend.batch_size=2",  # many shards, so a kill lands between two of them
]


# The stages of one round of the tiny recipe, in order; round 0 is the eval of the starting policy.
BEFORE_SFT = ["generate", "score", "filter", "select"]
ROUND = BEFORE_SFT + ["sft", "dpo", "eval"]
RUN_1 = [(0, "eval")] + [(1, s) for s in ROUND]


def posttrain(*args, check=True, timeout=300):
    proc = subprocess.run(POSTTRAIN + list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"posttrain {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def manifest(run_dir):
    return json.loads((Path(run_dir) / "manifest.json").read_text())


def stage(run_dir, round_idx, name):
    return next(e for e in manifest(run_dir)["stages"] if (e["round"], e["stage"]) == (round_idx, name))


def stage_keys(run_dir):
    """What must match between an interrupted-then-resumed run and an uninterrupted one. (Weights trained with a
    resume in between may differ from uninterrupted ones in the last float bits, so hashes of stages downstream
    of training are not compared; generated texts are, exactly.)"""
    return [(e["round"], e["stage"], e["config_hash"], json.dumps(e["rows"])) for e in manifest(run_dir)["stages"]]


def texts(run_dir, round_idx=1):
    ds = datasets.load_from_disk(str(Path(run_dir) / f"round_{round_idx}" / "01_generate" / "generations"))
    return [(r["prompt_id"], r["sample_idx"], r["text"]) for r in ds]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted round-1 run of the tiny recipe."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    proc = posttrain(*FAST, f"run_dir={run_dir}")
    return run_dir, proc


def test_tiny_round_distills_teacher_into_student(finished):
    run_dir, proc = finished
    assert [(e["round"], e["stage"]) for e in manifest(run_dir)["stages"]] == RUN_1
    entries = {e["stage"]: e for e in manifest(run_dir)["stages"] if e["round"] == 1}
    assert entries["select"]["metrics"]["sft_rows"] == 24  # best-of-2 per prompt
    gen, sft = entries["generate"], entries["sft"]
    assert gen["dir"] == "round_1/01_generate" and sft["dir"] == "round_1/05_sft"
    for e in entries.values():
        assert {"round", "stage", "config_hash", "inputs", "outputs", "rows", "seconds"} <= set(e)
    # The data stages leave their outputs as before and nothing of their work: no shard, prompt list or checkpoint
    work = {"shards", "prompts.jsonl", "heldout.jsonl", "checkpoints", "scratch", "journal", "kept.arrow",
            "removed.arrow"}
    for e in manifest(run_dir)["stages"]:
        folder = run_dir / e["dir"]
        assert not {p.name for p in folder.iterdir()} & work, e["dir"]
        for out in e["outputs"].values():
            if (folder / out / "state.json").exists():  # a datasets folder: its Arrow files and two JSON files
                names = {p.name for p in (folder / out).iterdir()}
                assert {"state.json", "dataset_info.json"} < names, names
                assert all(n.startswith("data-") and n.endswith(".arrow") for n in names - {"state.json",
                                                                                            "dataset_info.json"})
    assert entries["score"]["metrics"]["throughput"]["rows"] == 48 and entries["generate"]["metrics"][
        "throughput"]["shards"] == 12  # 24 prompts in shards of the backend's batch size (2)
    import torch

    from posttrain.models import native_bf16  # the precision the backend chose, on record

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert gen["metrics"]["backend"] == {"engine": "hf", "dtype": "bfloat16" if native_bf16(device) else "float32",
                                         "device": device, "kept": False}  # eval 0 answered as the student

    rows = datasets.load_from_disk(str(run_dir / gen["outputs"]["generations"]))
    assert len(rows) == 24 * 2 == gen["rows"]  # K=2 completions per prompt
    assert set(rows["sample_idx"]) == {0, 1}
    assert set(rows["model"]) == {"tiny://layers=2,hidden=64,seed=1,init_std=0.3"}  # the teacher wrote them
    assert set(rows["finish_reason"]) <= {"stop", "length"}

    m = sft["metrics"]
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.3, m  # the student learned the teacher's answers
    assert m["loss_curve"][-1]["loss"] < m["loss_curve"][0]["loss"]
    assert (run_dir / sft["outputs"]["model"] / "model.safetensors").exists()
    assert (run_dir / "round_1/05_sft/train.log").read_text().count("loss") > 0
    assert "round_1/sft" in proc.stdout and "ran" in proc.stdout
    assert (run_dir / "config.yaml").read_text().startswith("name: tiny")


def test_rerunning_a_finished_run_does_no_work(finished):
    run_dir, _ = finished
    before = (run_dir / "manifest.json").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (run_dir / "round_1").rglob("*")}
    proc = posttrain(*FAST, f"run_dir={run_dir}")
    assert (run_dir / "manifest.json").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "round_1").rglob("*")} == mtimes
    assert proc.stdout.count("done earlier") == len(RUN_1) and " ran" not in proc.stdout
    # cli.log holds each invocation's driver output, the first one's and this one's, one after the other
    log = (run_dir / "cli.log").read_text()
    first, second = log.split("\n=== ")[1:]
    assert "== round_1/sft: started in " in first and "== round_1/sft: finished in " in first
    assert first.count("  ran") == len(RUN_1)
    assert second.split("\n", 1)[1] == proc.stdout


def test_changed_config_on_finished_stage_errors_then_redo_keeps_old(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    proc = posttrain(*FAST, f"run_dir={run_dir}", "generate.temperature=0.7", check=False)
    assert proc.returncode == 2
    assert "round_1/generate" in proc.stderr and "temperature" in proc.stderr and "redo=" in proc.stderr
    assert manifest(run_dir) == manifest(finished[0])
    last = (run_dir / "cli.log").read_text().split("\n=== ")[-1]
    assert "generate.temperature=0.7" in last.splitlines()[0] and "posttrain: error: StageChanged" in last

    posttrain(*FAST, f"run_dir={run_dir}", "generate.temperature=0.7", "redo=[round_1/generate]")
    m = manifest(run_dir)
    # The stages downstream consumed the remade generations, so they were redone too; all old folders are kept.
    assert [e["stage"] for e in m["superseded"]] == ROUND  # the round-0 eval did not read the generations
    assert all((run_dir / e["dir"]).is_dir() for e in m["superseded"])
    assert texts(run_dir) != texts(finished[0])


def test_round_2_after_round_1_runs_only_round_2(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished[0], run_dir)
    round_1 = manifest(run_dir)["stages"]
    proc = posttrain(*FAST, f"run_dir={run_dir}", "round=2")
    stages = manifest(run_dir)["stages"]
    assert stages[: len(RUN_1)] == round_1
    assert [(e["round"], e["stage"]) for e in stages[len(RUN_1):]] == [(2, s) for s in ROUND]
    assert proc.stdout.count("done earlier") == len(RUN_1)
    # Round 2 draws different prompts from the pool.
    assert not {t[0] for t in texts(run_dir, 2)} & {t[0] for t in texts(run_dir, 1)}


def _kill_when(args, run_dir, ready, timeout=120):
    """Start posttrain, SIGKILL its whole process group as soon as `ready()` is true."""
    proc = subprocess.Popen(POSTTRAIN + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("posttrain finished (or hung) before the point where the test kills it")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_generation_then_rerun_matches_uninterrupted(finished, tmp_path):
    run_dir = tmp_path / "run"
    shards = run_dir / "round_1" / ".01_generate.partial" / "shards"
    # a shard is done when its sidecar (rows, tokens, seconds) is written, after its Arrow file
    _kill_when([*FAST, f"run_dir={run_dir}"], run_dir, lambda: len(list(shards.glob("[0-9]*.json"))) >= 2)
    assert "generate" not in [e["stage"] for e in manifest(run_dir)["stages"]]
    done_before_rerun = {p.name for p in shards.glob("[0-9]*.json")}
    assert 2 <= len(done_before_rerun) < 12  # killed halfway: 12 shards of 2 prompts

    posttrain(*FAST, f"run_dir={run_dir}")
    assert stage_keys(run_dir) == stage_keys(finished[0])
    assert texts(run_dir) == texts(finished[0])
    assert stage(run_dir, 1, "generate")["output_hash"] == stage(finished[0], 1, "generate")["output_hash"]


def _checkpoints(trainer) -> tuple[list[str], list[str]]:
    """(complete, incomplete) checkpoint folder names: a complete one has its trainer_state.json, written last."""
    folders = sorted(trainer.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    return ([c.name for c in folders if (c / "trainer_state.json").exists()],
            [c.name for c in folders if not (c / "trainer_state.json").exists()])


def test_sigkill_as_a_checkpoint_appears_then_rerun_resumes_from_the_last_complete_one(finished, tmp_path):
    run_dir = tmp_path / "run"
    trainer = run_dir / "round_1" / ".05_sft.partial" / "trainer"
    # Killed the moment a second checkpoint folder appears, before the Trainer has written its trainer_state.json.
    _kill_when([*FAST, f"run_dir={run_dir}"], run_dir, lambda: all(_checkpoints(trainer)))
    assert [e["stage"] for e in manifest(run_dir)["stages"]] == ["eval"] + BEFORE_SFT
    complete, incomplete = _checkpoints(trainer)
    assert complete and incomplete, "the kill did not land while a checkpoint was being written"

    posttrain(*FAST, f"run_dir={run_dir}")
    assert stage_keys(run_dir) == stage_keys(finished[0])
    assert texts(run_dir) == texts(finished[0])
    resumed = stage(run_dir, 1, "sft")["metrics"]
    assert resumed["resumed_from"] == complete[-1]
    baseline = stage(finished[0], 1, "sft")["metrics"]
    assert resumed["steps"] == baseline["steps"]
    assert resumed["eval_loss_after"] == pytest.approx(baseline["eval_loss_after"], abs=1e-3)


def test_sigkill_during_dpo_then_rerun_resumes_and_reuses_reference_logps(finished, tmp_path):
    run_dir = tmp_path / "run"
    trainer = run_dir / "round_1" / ".06_dpo.partial" / "trainer"
    _kill_when([*FAST, f"run_dir={run_dir}"], run_dir,
               lambda: any((c / "trainer_state.json").exists() for c in trainer.glob("checkpoint-*")))
    assert [e["stage"] for e in manifest(run_dir)["stages"]] == ["eval"] + BEFORE_SFT + ["sft"]

    posttrain(*FAST, f"run_dir={run_dir}")
    assert stage_keys(run_dir) == stage_keys(finished[0])
    resumed = stage(run_dir, 1, "dpo")["metrics"]
    assert resumed["resumed_from"] and resumed["resumed_from"].startswith("checkpoint-")
    assert set(resumed["ref_logps"].values()) == {"stored"}  # computed before the kill, not again


def test_cfg_job_prints_the_recipe_without_running(tmp_path):
    proc = posttrain("experiment=tiny", f"run_dir={tmp_path / 'run'}", "--cfg", "job")
    assert "generate:" in proc.stdout and "k: 2" in proc.stdout
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_multirun_gives_each_job_its_own_run_dir(tmp_path):
    posttrain("-m", "experiment=tiny", f"run_dir={tmp_path}", "data.num_prompts=4", "sft.enabled=false",
              "dpo.enabled=false", "generate.k=1,2")
    for k in (1, 2):  # Hydra's override_dirname, less round/run_dir/redo/experiment
        job_dir = tmp_path / f"data.num_prompts=4,dpo.enabled=False,generate.k={k},sft.enabled=False"
        assert stage(job_dir, 1, "generate")["rows"] == 4 * k


def test_user_recipe_from_own_config_dir(tmp_path):
    (tmp_path / "recipes" / "experiment").mkdir(parents=True)
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"m{i}", "prompt": f"Count to {i}."}) + "\n" for i in range(3)))
    (tmp_path / "recipes" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n"
        f"# posttrain --config-dir {tmp_path / 'recipes'} experiment=mine\n"
        "defaults:\n  - tiny\n"
        f"name: mine\nrun_dir: {tmp_path / 'run'}\ndata:\n  prompts: {prompts}\n  num_prompts: 3\n"
        "sft:\n  enabled: false\ndpo:\n  enabled: false\n"
    )
    posttrain("--config-dir", str(tmp_path / "recipes"), "experiment=mine")
    assert sorted({t[0] for t in texts(tmp_path / "run")}) == ["m0", "m1", "m2"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.pathh=x", "pathh"),
        ("generate.backend._target_=os.system", "generate.backend._target_"),
        ("generate.k=0", "generate.k"),
        ("model.path=/no/such/model", "model.path"),
    ],
)
def test_bad_recipe_fails_before_any_stage_naming_the_key(tmp_path, override, expected):
    proc = posttrain("experiment=tiny", f"run_dir={tmp_path / 'run'}", override, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "run" / "round_1").exists()


def test_malformed_prompt_file_names_file_and_line(tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "broken"\n')
    proc = posttrain("experiment=tiny", f"run_dir={tmp_path / 'run'}", f"data.prompts={bad}", check=False)
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and "invalid JSON" in proc.stderr


def test_failing_training_process_fails_the_stage_with_its_log(tmp_path):
    proc = posttrain("experiment=tiny", f"run_dir={tmp_path / 'run'}", "data.num_prompts=4",
                     "sft.lora.enabled=true", "sft.lora.target_modules=[no_such_module]", check=False)
    assert proc.returncode == 2
    assert "posttrain.train.sft exited with code" in proc.stderr
    assert "no_such_module" in proc.stderr  # the child's own error, from the end of its log
    assert [e["stage"] for e in manifest(tmp_path / "run")["stages"]] == ["eval"] + BEFORE_SFT
    last = proc.stderr.strip().splitlines()[-1]  # one closing line naming the stage and the cause
    assert last.startswith("posttrain: error: stage round_1/sft failed: posttrain.train.sft exited with code"), last
    assert (tmp_path / "run" / "round_1" / ".05_sft.partial" / "error.log").exists()


def test_hydra_hooks_are_refused_before_they_run(tmp_path):
    """hydra.callbacks and logging factories run before posttrain's validation (even with dry_run=true): they are
    refused first, with one error line naming the key, and nothing is written anywhere."""
    marker = tmp_path / "ran"
    recipes = tmp_path / "my_recipes" / "experiment"
    recipes.mkdir(parents=True)
    (recipes / "evil.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\nhydra:\n  job_logging:\n    handlers:\n      console:\n"
        f"        (): pathlib.Path.touch\n        self: {marker}\n")
    run_dir = tmp_path / "run"
    for args in (["--config-dir", str(tmp_path / "my_recipes"), "experiment=evil"],
                 ["experiment=tiny", "+hydra.callbacks.evil._target_=pathlib.Path.touch",
                  f"+hydra.callbacks.evil.self={marker}"]):
        proc = posttrain(*args, f"run_dir={run_dir}", "dry_run=true", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("posttrain: error: hydra") and ("callbacks" in last or "factory" in last), last
        assert not marker.exists() and not run_dir.exists()


def test_a_failed_validation_writes_nothing_and_a_credentialed_url_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    proc = posttrain("experiment=tiny", f"run_dir={run_dir}", "+generate.backend.base_url=https://u:hunter2@h/v1",
                     check=False)
    assert proc.returncode == 2 and "a URL with credentials in it" in proc.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("recipe, args, expected", [
    ("# posttrain\ndefaults:\n  - tiny\nname: mine\n", [],
     "make `# @package _global_` the first line of that file"),
    ("# @package _global_\ndefaults:\n  - tiny\nreward:\n  rewards:\n    - _target_: reward.verifiers.LengthPenalty\n",
     [], "is given as a list, but it maps names to configs"),
    (None, ["experiment=tiny", "reward.rewards=[{_target_:reward.verifiers.LengthPenalty}]"],
     "reward.rewards is given as a list, but it maps names to configs"),
])
def test_common_hydra_mistakes_are_answered_with_what_to_write(tmp_path, recipe, args, expected):
    if recipe is not None:
        (tmp_path / "experiment").mkdir()
        (tmp_path / "experiment" / "mine.yaml").write_text(recipe)
        args = ["--config-dir", str(tmp_path), "experiment=mine"]
    proc = posttrain(*args, "dry_run=true", check=False)
    assert proc.returncode == 2 and "posttrain: error: " in proc.stderr and expected in proc.stderr, proc.stderr
    assert "HYDRA_FULL_ERROR" not in proc.stderr


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of `folder` (all files: one per writer session): tag -> (step,
    value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_stay_in_the_run_directory_and_a_resumed_stage_appends(tmp_path):
    run_dir = tmp_path / "run"
    args = [*FAST, f"run_dir={run_dir}", "sft.report_to=[tensorboard]", "dpo.enabled=false", "sft.logging_steps=1"]
    trainer = run_dir / "round_1" / ".05_sft.partial" / "trainer"
    # killed once a checkpoint is complete, so the rerun resumes the stage
    _kill_when(args, run_dir, lambda: _checkpoints(trainer)[0] != [])
    posttrain(*args, "round=2")
    sft = run_dir / "round_1" / "05_sft" / "tensorboard"
    writers = {p.name.split(".")[-2] for p in sft.glob("events.out.tfevents.*")}  # events.out.tfevents.T.HOST.PID.N
    assert len(writers) == 2  # the first attempt's process and the resumed one's wrote into the same folder
    steps = sorted({s for s, _ in _scalars(sft)["train/loss"]})
    total = stage(run_dir, 1, "sft")["metrics"]["steps"]
    assert steps == list(range(1, total + 1))  # every step: before the kill, then on from the checkpoint
    evals = _scalars(run_dir / "tensorboard" / "evals")
    assert [s for s, _ in evals["eval/reward/brevity.mean"]] == [0, 1, 2]  # one point a round, one series
    means = [e["metrics"]["reward"]["brevity.mean"] for e in manifest(run_dir)["stages"] if e["stage"] == "eval"]
    assert [v for _, v in evals["eval/reward/brevity.mean"]] == pytest.approx(means)
    folders = {str(p.parent.relative_to(run_dir)) for p in run_dir.rglob("events.out.tfevents.*")}
    assert folders == {"round_1/05_sft/tensorboard", "round_2/05_sft/tensorboard", "tensorboard/evals"}
    assert not (tmp_path / "runs").exists() and not (Path.cwd() / "runs").exists()
