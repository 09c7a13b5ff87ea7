"""Every recipe composes, opens with the command that runs it, and the real-size ones plan cleanly offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from posttrain.config import register

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EXPERIMENTS = sorted(p.stem for p in (RECIPES / "experiment").glob("*.yaml"))
REAL_SIZE = [e for e in EXPERIMENTS if e.startswith("llama3_")]


@pytest.mark.parametrize("group", sorted(p.name for p in RECIPES.iterdir() if p.is_dir() and p.name != "__pycache__"))
def test_every_group_option_composes(group):
    register()
    options = sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))
    if group in ("experiment", "deepspeed"):
        pytest.skip(f"{group} is covered by its own tests")
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        for option in options:
            cfg = compose("config", overrides=[f"{group}={option}"])
            assert cfg.run_dir


@pytest.mark.parametrize("option", sorted(p.stem for p in (RECIPES / "launch").glob("*.yaml")))
def test_every_launch_option_gives_a_launch_command(option):
    """Hardware settings live in recipes/launch/; each option is a complete, valid launch."""
    from omegaconf import OmegaConf

    from posttrain.train.launch import command

    register()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose("config", overrides=[f"launch={option}"])
    cmd = command("posttrain.train.sft", "train_config.json", OmegaConf.to_container(cfg.launch, resolve=True))
    assert cmd[-3:] == ["-m", "posttrain.train.sft", "train_config.json"]
    assert (cfg.launch.deepspeed is None) == (option == "single")  # every multi-process option shards with ZeRO-3
    if cfg.launch.launcher == "accelerate":
        assert "--use_deepspeed" in cmd


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_opens_with_its_command(experiment):
    register()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={experiment}"])
    assert cfg.name
    lines = (RECIPES / "experiment" / f"{experiment}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    command = " ".join(lines[1:3])
    assert "posttrain" in command and f"experiment={experiment}" in command, lines[:3]


@pytest.fixture(scope="module")
def real_size_prompts(tmp_path_factory) -> dict:
    """A pool as big as the real-size recipes draw from (50,000 prompts a round), given as their recipes ask."""
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: explain item {i}."}) + "\n"
                            for i in range(100_000)))
    return {"POSTTRAIN_PROMPTS": str(path), "POSTTRAIN_HELDOUT": "pkg://evals/data/tiny_heldout.jsonl"}


def test_real_size_recipes_name_the_environment_variables_they_need(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("POSTTRAIN_PROMPTS", "POSTTRAIN_HELDOUT")}
    proc = subprocess.run([sys.executable, "-m", "recipes.cli", "experiment=llama3_70b_iterative", "dry_run=true",
                           f"run_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0
    assert "data.prompts: the environment variable POSTTRAIN_PROMPTS is not set" in proc.stderr
    assert "evals.heldout: the environment variable POSTTRAIN_HELDOUT is not set" in proc.stderr


@pytest.mark.parametrize("experiment", REAL_SIZE)
def test_real_size_recipe_dry_run_prints_the_plan_and_writes_nothing(experiment, tmp_path, real_size_prompts):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "recipes.cli", f"experiment={experiment}", f"run_dir={run_dir}", "round=2",
         "dry_run=true"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **real_size_prompts},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "== round_0/eval: would run" in out
    for r in (1, 2):
        assert f"== round_{r}/generate: would run" in out and f"== round_{r}/eval: would run" in out
    assert "--use_deepspeed" in out and "recipes/deepspeed/zero3" in out  # training stages under ZeRO-3
    assert not run_dir.exists()
