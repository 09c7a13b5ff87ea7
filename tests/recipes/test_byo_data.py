"""Bring your own data, take TRL-ready data out: the tiny recipe seeded from an UltraFeedback-style preference
JSONL and a prompt-completion parquet with its own column names, prompts mixed from two sources, bad rows caught
before any stage, and `posttrain-export`'s output trained on by TRL's own trainers. The run also distils at the
token level (the tiny teacher's top-32 log-probs), so its SFT mixes KD rows with the user's cross-entropy rows."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from hydra import compose, initialize_config_module

from posttrain.config import register
from posttrain.errors import PosttrainError
from recipes.validate import validate

register()
POSTTRAIN = [sys.executable, "-m", "recipes.cli"]
TOPICS = ["a volcano", "a lighthouse", "a glacier", "a beehive", "a canyon", "a comet"]


def ultrafeedback(path: Path, bad_row: int | None = None) -> str:
    """HuggingFaceH4/ultrafeedback_binarized's shape: a prompt string, and chosen/rejected as whole conversations."""
    with open(path, "w") as f:
        for i, topic in enumerate(TOPICS):
            user = {"role": "user", "content": f"Describe {topic} in one short sentence."}
            chosen = [user, {"role": "assistant", "content": f"It is {topic}."}]
            rejected = [user, {"role": "assistant", "content": f"I refuse to talk about {topic} at any length."}]
            if i == bad_row:
                chosen = [user, {"role": "robot", "content": "beep"}]
            f.write(json.dumps({"prompt": user["content"], "prompt_id": f"uf-{i}", "chosen": chosen,
                                "rejected": rejected, "score_chosen": 8.0, "score_rejected": 2.0}) + "\n")
    return str(path)


def alpaca_parquet(path: Path, bad_row: int | None = None) -> str:
    """A prompt-completion set under other column names (instruction/output), mapped with `columns`."""
    rows = [{"instruction": f"Name {topic}.", "output": f"That is {topic}." if i != bad_row else ""}
            for i, topic in enumerate(TOPICS)]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def sft_set(path: Path) -> str:
    """An SFT `messages` set used as a prompt source: the trailing answers are dropped."""
    with open(path, "w") as f:
        for i, topic in enumerate(TOPICS * 2):
            f.write(json.dumps({"id": f"mine-{i}", "messages": [
                {"role": "user", "content": f"Write a line about {topic}, take {i}."},
                {"role": "assistant", "content": "..."}]}) + "\n")
    return str(path)


def overrides(tmp_path: Path, **bad) -> list[str]:
    prefs = ultrafeedback(tmp_path / "prefs.jsonl", bad.get("prefs"))
    sft = alpaca_parquet(tmp_path / "sft.parquet", bad.get("sft"))
    mine = sft_set(tmp_path / "mine.jsonl")
    return [
        "experiment=tiny", "debug=fast", "evals.heldout=null",
        f"data.prompts=['pkg://data_gen/prompts/tiny.jsonl',{{path:'{mine}',weight:0.5}}]",
        f"sft.data=[{{path:'{sft}',columns:{{prompt:instruction,completion:output}},weight:2}}]",
        f"dpo.data=['{prefs}']",
        "generate.teacher_logprobs=32", "sft.kd.weight=0.5",
    ]


def test_a_bad_row_in_either_source_stops_the_run_before_any_stage_naming_source_row_and_column(tmp_path):
    for bad, expected in [({"prefs": 3}, "dpo.data[0]: {dir}/prefs.jsonl:4, column 'chosen': message 1"),
                          ({"sft": 2}, "sft.data[0]: {dir}/sft.parquet row 2, column 'completion': empty answer")]:
        with initialize_config_module(config_module="recipes", version_base="1.3"):
            cfg = compose("config", overrides=overrides(tmp_path, **bad))
        with pytest.raises(PosttrainError) as err:
            validate(cfg)
        assert expected.format(dir=tmp_path) in str(err.value)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """One round of the tiny recipe with the user's data mixed in."""
    tmp = tmp_path_factory.mktemp("byo")
    run_dir = tmp / "run"
    proc = subprocess.run(POSTTRAIN + overrides(tmp) + [f"run_dir={run_dir}"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, json.loads((run_dir / "manifest.json").read_text())


def entry(manifest, stage):
    return next(e for e in manifest["stages"] if e["stage"] == stage)


def test_the_tiny_recipe_trains_on_the_users_data_mixed_by_weight(seeded):
    run_dir, manifest = seeded
    gen = datasets.load_from_disk(str(run_dir / entry(manifest, "generate")["outputs"]["generations"]))
    ids = {r["prompt_id"] for r in gen}
    assert len(ids) == 24 and sum(i.startswith("mine-") for i in ids) == 8  # weights 1 : 0.5 of 24 prompts
    assert all(r["messages"][-1]["role"] == "user" for r in gen)  # the SFT set's answers are not in its prompts

    sft = entry(manifest, "sft")
    assert sft["metrics"]["user_data"]["sft.data[0]"] == {
        "path": str(run_dir.parent / "sft.parquet"), "weight": 2.0, "rows": 6, "identical": 0, "used": 12}
    assert "user_data" in sft["input_hashes"]  # a changed file is noticed on rerun
    mixed = datasets.load_from_disk(str(run_dir / sft["dir"] / "user_data"))
    assert len(mixed) == 12 and mixed[0]["messages"] == [{"role": "user", "content": "Name a volcano."}]
    select_rows = entry(manifest, "select")["rows"]["sft"]
    assert sft["metrics"]["train_rows"] + sft["metrics"]["eval_rows"] == select_rows + 12

    # Token-level distillation: the teacher's top-32 at every generated token, stored compactly, carried through
    # score, filter and select to the SFT rows; the user's rows train with cross-entropy only.
    assert gen.features["topk_logprobs"].feature.feature.dtype == "float16"
    assert entry(manifest, "generate")["metrics"]["backend"]["dtype"] == "float32"  # not bf16 for KD targets
    assert gen.features["topk_ids"].feature.feature.dtype == "int32"
    for r in gen:
        assert len(r["topk_ids"]) == r["completion_tokens"] + (r["finish_reason"] == "stop")
        assert all(len(top) == 32 for top in r["topk_ids"])
    kd = sft["metrics"]["kd"]
    assert entry(manifest, "generate")["metrics"]["teacher_logprobs"]["tokens"] == sum(len(t) for t in gen["topk_ids"])
    users_trained = sft["metrics"]["train_rows"] - kd["rows_with_teacher"] - kd["unaligned"]
    assert 0 < users_trained <= 12 and kd["rows_with_teacher"] > 0 and kd["weight"] == 0.5

    dpo = entry(manifest, "dpo")
    assert dpo["metrics"]["user_data"]["dpo.data[0]"]["used"] == 6
    pairs = datasets.load_from_disk(str(run_dir / dpo["dir"] / "user_data"))
    assert pairs[0]["messages"] == [{"role": "user", "content": "Describe a volcano in one short sentence."}]
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == (
        "It is a volcano.", "I refuse to talk about a volcano at any length.")
    total = dpo["rows"]["train_pairs"] + dpo["rows"]["eval_pairs"]
    assert total == entry(manifest, "select")["rows"]["pairs"] + 6 and dpo["metrics"]["steps"] > 0


def test_export_trains_with_trls_own_trainers_unchanged(seeded, tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    run_dir, manifest = seeded
    for what in ("sft", "pairs"):
        subprocess.run([sys.executable, "-m", "recipes.export", str(run_dir), "--what", what,
                        "--format", "parquet" if what == "sft" else "jsonl", "--out", str(tmp_path / what)],
                       check=True, capture_output=True)
    card = (tmp_path / "pairs" / "README.md").read_text()
    assert "| K (generate.k) | 2 |" in card and "brevity (reward.verifiers.LengthPenalty)" in card
    sft = datasets.load_dataset(str(tmp_path / "sft"), split="train")
    pairs = datasets.load_dataset(str(tmp_path / "pairs"), split="train")
    selected = entry(manifest, "select")["rows"]
    assert (len(sft), len(pairs)) == (selected["sft"], selected["pairs"])
    assert sft[0]["completion"][0]["role"] == "assistant" and pairs[0]["chosen"][0]["role"] == "assistant"

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2, report_to="none",
                  save_strategy="no", use_cpu=True, max_length=128)
    for trainer_cls, config_cls, data in ((SFTTrainer, SFTConfig, sft), (DPOTrainer, DPOConfig, pairs)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = trainer_cls(model=model, args=config_cls(output_dir=str(tmp_path / config_cls.__name__), **common),
                              train_dataset=data, processing_class=tokenizer)
        trainer.train()
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters()), trainer_cls.__name__


def test_your_training_data_must_not_hold_a_held_out_prompt(tmp_path):
    first = (Path(__file__).parents[2] / "evals" / "data" / "tiny_heldout.jsonl").read_text().splitlines()[0]
    heldout = json.loads(first)
    leak = tmp_path / "leak.jsonl"
    leak.write_text(json.dumps({"prompt": heldout["prompt"], "completion": "an answer"}) + "\n")
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=tiny", f"sft.data=['{leak}']"])
    with pytest.raises(PosttrainError) as err:
        validate(cfg)
    assert "evals.heldout: 1 held-out prompt(s) are also prompts of your training data" in str(err.value)
    assert f"sft.data[0]: {leak}" in str(err.value)


def test_export_never_passes_raw_samples_off_as_an_sft_set(tmp_path):
    from recipes.export import find

    stages = [{"round": r, "stage": s, "outputs": {"sft": "x", "pairs": "y"} if s == "select" else
               {"generations": "g"} if s == "generate" else {"scored": "s"}, "dir": f"round_{r}/{s}"}
              for r, names in ((1, ("generate", "score", "select")), (2, ("generate", "score"))) for s in names]
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": stages}))
    entry, output = find(tmp_path, "sft", None)  # round 2 has not selected yet: round 1's SFT set
    assert (entry["round"], entry["stage"], output) == (1, "select", "sft")
    with pytest.raises(PosttrainError, match="round 2 has no finished select or generate stage"):
        find(tmp_path, "sft", 2)
