"""Iterative self-training on a tiny verifiable task: the policy's mean held-out reward after round 2 is higher
than after round 0 by more than the spread across seeds.

The task is a fixed answer format: a sentence that opens with "The " and closes with a full stop (half a point
for each). Its reward is a user reward plugged in from outside posttrain: a module written to a temporary folder
on PYTHONPATH, allowed by `allowed_targets`. Each round the loop samples the current policy (generate.source=
policy, K=8 per prompt), scores the samples, keeps the best of K for SFT and best vs worst for DPO, fine-tunes the
policy (sft.init=policy) and then DPO-trains it, and evaluates it greedily on the held-out prompts.

The student is the tiny Llama briefly pretrained on the tokenizer's corpus (`tiny://...,pretrain_steps=300`,
posttrain/tiny.py). A random-init student cannot be self-trained: its samples hold partial UTF-8 byte tokens,
training on them makes those tokens likelier, and after a round its greedy answers are U+FFFD garbage.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain import models
from posttrain.tiny import build_tiny, build_tiny_tokenizer, corpus_chats

POSTTRAIN = [sys.executable, "-m", "recipes.cli"]
STUDENT = "tiny://layers=2,hidden=64,seed=0,pretrain_steps=300"
SEEDS = (0, 1, 2)

# The user's reward, as a user would write it: `(prompts, responses) -> scores` (reward/protocol.py).
REWARD_MODULE = '''\
"""A fixed answer format: a sentence that opens with "The " and closes with a full stop."""


def fixed_format(prompts, responses):
    """Half a point for opening with "The ", half a point for closing with "."."""
    return [0.5 * response.startswith("The ") + 0.5 * response.endswith(".") for response in responses]
'''

OVERRIDES = [
    "experiment=tiny",
    "round=2",
    f"model.path='{STUDENT}'",
    "generate.source=policy",  # self-training: the policy answers its own prompts
    "generate.k=8",  # best of 8 samples at temperature 1.0 (the tiny recipe's)
    "sft.init=policy",  # each round continues from the last policy
    "~reward.rewards.brevity",  # the tiny recipe's length reward out, the format reward in
    "+reward.rewards.format={_target_: format_reward.fixed_format}",
    "allowed_targets=[format_reward.]",
    "evals.teacher=false",  # no teacher in the loop: no teacher answers, no win rate against it
    "+evals.suites.win_rate.against=[previous]",
]


def load_reward_module(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "format_reward.py").write_text(REWARD_MODULE)
    namespace: dict = {}
    exec(compile(REWARD_MODULE, str(folder / "format_reward.py"), "exec"), namespace)
    return namespace["fixed_format"]


def test_format_reward_scores_the_format(tmp_path):
    fixed_format = load_reward_module(tmp_path)
    responses = ["The capital of France is Paris.", "The capital", "Paris.", "paris", "the end.", ""]
    assert fixed_format([{}] * len(responses), responses) == [1.0, 0.5, 0.5, 0.0, 0.5, 0.0]


# --- the pretrained tiny student (posttrain/tiny.py: build_tiny(..., pretrain_steps=N)) -------------------------

SMALL = dict(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)


def corpus_loss(folder: Path) -> float:
    from transformers import AutoModelForCausalLM

    tok = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    losses = []
    with torch.no_grad():
        for chat in corpus_chats():
            ids = torch.tensor([tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]])
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return statistics.mean(losses)


def test_pretrained_build_is_deterministic_and_learns_the_corpus(tmp_path):
    random_init = build_tiny(tmp_path / "random", **SMALL)
    a = build_tiny(tmp_path / "a", **SMALL, pretrain_steps=40)
    b = build_tiny(tmp_path / "b", **SMALL, pretrain_steps=40)
    wa, wb, w0 = (load_file(p / "model.safetensors") for p in (a, b, random_init))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], w0[k]) for k in wa)
    assert corpus_loss(a) < corpus_loss(random_init) - 1.0  # a random model sits near ln(512) = 6.2
    # pretrain_steps=0, the default, is the plain random init
    w00 = load_file(build_tiny(tmp_path / "zero", **SMALL, pretrain_steps=0) / "model.safetensors")
    assert all(torch.equal(w0[k], w00[k]) for k in w0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "random", "zero"]


def test_tiny_spec_passes_pretraining_through():
    assert models._tiny_kwargs("tiny://layers=2,pretrain_steps=300,pretrain_lr=1e-3") == {
        "layers": 2, "pretrain_steps": 300, "pretrain_lr": 1e-3}
    assert models._tiny_kwargs("tiny://layers=2,hidden=64,seed=0") == {"layers": 2, "hidden": 64, "seed": 0}


# --- the loop, three seeds --------------------------------------------------------------------------------------


def reward_mean(run_dir: Path, round_idx: int) -> float:
    metrics = json.loads((run_dir / f"round_{round_idx}" / "07_eval" / "metrics.json").read_text())
    return metrics["reward"]["format.mean"]


@pytest.mark.slow  # ~4 min on 2 CPU cores: three seeds of two rounds each, one after another
def test_self_training_raises_the_held_out_reward_beyond_the_seed_spread(tmp_path):
    plugins = tmp_path / "plugins"
    load_reward_module(plugins)
    path = [str(plugins), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}

    means, seconds = {}, {}
    for seed in SEEDS:
        run_dir = tmp_path / f"seed_{seed}"
        start = time.monotonic()
        proc = subprocess.run(POSTTRAIN + OVERRIDES + [f"run_dir={run_dir}", f"seed={seed}"],
                              env=env, capture_output=True, text=True, timeout=600)
        seconds[seed] = time.monotonic() - start
        assert proc.returncode == 0, f"seed {seed} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        means[seed] = [reward_mean(run_dir, r) for r in (0, 1, 2)]
        # Round 2 sampled the policy round 1 made, not the starting model or a teacher.
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
        generate_2 = next(e for e in stages if (e["round"], e["stage"]) == (2, "generate"))
        assert generate_2["inputs"]["model"] == "round_1/06_dpo/model"

    round_0 = [means[s][0] for s in SEEDS]
    round_2 = [means[s][2] for s in SEEDS]
    improvement = statistics.mean(round_2) - statistics.mean(round_0)
    spread = max(round_2) - min(round_2)  # greedy eval: round 0 is the same starting model, so the same answers
    spread_0 = max(round_0) - min(round_0)
    report = "\n".join(
        [f"seed {s}: format.mean round 0 {means[s][0]:.3f}, round 1 {means[s][1]:.3f}, round 2 {means[s][2]:.3f} "
         f"({seconds[s]:.0f} s)" for s in SEEDS]
        + [f"mean round 0 {statistics.mean(round_0):.3f}, mean round 2 {statistics.mean(round_2):.3f}: "
           f"improvement {improvement:.3f}; spread across seeds (max - min) round 2 {spread:.3f}, "
           f"round 0 {spread_0:.3f}"]
    )
    print(report)
    assert improvement > max(spread, spread_0), report
