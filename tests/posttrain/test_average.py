"""Checkpoint averaging equals the hand-computed average."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from posttrain.average import average_checkpoints
from posttrain.errors import PosttrainError
from posttrain.tiny import build_tiny


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return [build_tiny(root / f"s{s}", seed=s) for s in range(3)]


def state(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_weighted_average_equals_hand_computed(three, tmp_path):
    out = average_checkpoints(three, tmp_path / "avg", weights=[2, 1, 1])
    got, parts = state(out), [state(p) for p in three]
    for name, tensor in got.items():
        expected = 0.5 * parts[0][name] + 0.25 * parts[1][name] + 0.25 * parts[2][name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    assert (out / "tokenizer.json").exists() and (out / "averaged_from.json").exists()


def test_uniform_average_of_one_model_with_itself_is_the_model(three, tmp_path):
    out = average_checkpoints([three[0], three[0]], tmp_path / "avg")
    a, b = state(out), state(three[0])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_different_architectures_and_existing_output_are_refused(three, tmp_path):
    other = build_tiny(tmp_path / "wide", hidden=32, heads=2, kv_heads=1)
    with pytest.raises(PosttrainError, match="shape"):
        average_checkpoints([three[0], other], tmp_path / "avg")
    (tmp_path / "exists").mkdir()
    with pytest.raises(PosttrainError, match="never overwrites"):
        average_checkpoints(three, tmp_path / "exists")


def test_command_line(three, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "posttrain.average", str(tmp_path / "avg"), *map(str, three[:2])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "avg" / "model.safetensors").exists()
