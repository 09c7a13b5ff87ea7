"""Real DeepSpeed ZeRO-3: the SFT, DPO and RM stages launched with 2 processes on CPU (gloo), through the stage
functions a run calls, on the tiny model. Each leaves a plain HF folder with the full weights gathered from the
shards, and 2-process ZeRO-3 trains the same model as 1 process.

Why SFT's 1-process and 2-process loss curves can be compared step by step: both runs take the same global batch
(8 rows: 8 on one process, 4 on each of two), and accelerate's seedable sampler gives every rank the same
permutation, rank r taking the per-device batches r, r + 2, ..., so optimizer step k sees the rows of the
1-process run's batch k. The loss is normalised by the token count of the whole global batch across ranks, and
the weights start from the same checkpoint (ZeRO-3 partitions it as it loads). The math is the same; what is left
is float32 summation order in gloo's reduce-scatter and all-gather: measured at ~1e-7 relative on every step of
this run. The tolerance, 1e-4 relative, is 1000x that and well below what a distribution bug does (a rank's half
of the batch lost or counted twice, gradients summed instead of averaged, a step count off) which moves the loss
by more than 1e-2 from the second step.
"""

import dataclasses
import json
import random
from pathlib import Path

import datasets
import pytest
from safetensors.torch import load_file

from posttrain.config import DPOConfig, KDConfig, LaunchConfig, LoraConfig, RMConfig, SFTConfig, TrainJob
from posttrain.models import resolve_model
from posttrain.train.dpo import dpo_stage
from posttrain.train.rm import rm_stage
from posttrain.train.sft import sft_stage

pytestmark = pytest.mark.slow  # ~20-30 s a stage: two processes import torch, TRL and DeepSpeed

TINY = "tiny://layers=2,hidden=64,seed=0"
TEACHER = "tiny://layers=2,hidden=64,seed=1,init_std=0.3"
ZERO3 = LaunchConfig(launcher="torchrun", nproc=2, deepspeed="zero3")
TOPICS = ["the sea", "the stars", "autumn leaves", "France", "a week", "the sky", "prime numbers", "London",
          "fruit", "python", "the moon", "books", "cats", "dogs", "rain", "snow"]
LORA = LoraConfig(enabled=True, r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def base() -> Path:
    return Path(resolve_model(TINY))


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> str:
    """16 prompts, 2 answers each."""
    rows = [
        {"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
         "text": f"Here is a short answer about {topic}{'.' if k else ', in a few words.'} It is nice."}
        for i, topic in enumerate(TOPICS) for k in range(2)
    ]
    path = tmp_path_factory.mktemp("sft-data") / "generations"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def kd_data(tmp_path_factory, sft_data) -> str:
    """sft_data with a tiny teacher's top-8 log-probs at each answer token and the end of turn, computed here by
    a plain forward pass (not by the generate stage)."""
    import torch

    from data_gen.logprobs import kd_features
    from posttrain.models import load_causal_lm, load_tokenizer

    tok, teacher = load_tokenizer(TEACHER), load_causal_lm(TEACHER).eval()
    rows = datasets.load_from_disk(sft_data).to_list()
    for row in rows:
        prompt = tok.apply_chat_template(row["messages"], add_generation_prompt=True, return_dict=True)["input_ids"]
        prompt = list(prompt)
        ids = tok.encode(row["text"], add_special_tokens=False)
        with torch.no_grad():
            logits = teacher(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:]
        lps, top = torch.log_softmax(logits, -1).topk(8)
        row |= {"completion_ids": ids, "topk_ids": top.tolist(), "topk_logprobs": lps.tolist()}
    features = datasets.Features({**datasets.Dataset.from_list(rows[:1]).features, **kd_features()})
    path = tmp_path_factory.mktemp("kd-data") / "generations"
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(path))
    return str(path)


def _sft_job(launch: LaunchConfig, batch_size: int, **overrides) -> TrainJob:
    sft = SFTConfig(learning_rate=3e-3, epochs=2, batch_size=batch_size, max_length=128, logging_steps=1,
                    save_steps=1000, eval_fraction=0.2, lr_scheduler="constant", **overrides)
    return TrainJob(train=sft, seed=0, launch=launch)


def _check_full_folder(folder: Path, base: Path, auto_class=None) -> dict:
    """`folder` loads as a complete HF model whose every tensor has its full shape (a ZeRO-3 shard saved as is
    would be empty); returns its weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, info = (auto_class or AutoModelForCausalLM).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    AutoTokenizer.from_pretrained(folder)
    weights, start = load_file(str(folder / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert all(t.numel() > 0 for t in weights.values())
    shared = weights.keys() & start.keys()
    assert len(shared) >= len(start) - 1  # a sequence classifier has `score` instead of `lm_head`
    assert all(weights[k].shape == start[k].shape for k in shared)
    assert not (folder / "training_args.bin").exists()
    return weights


def test_sft_under_zero3_matches_one_process(tmp_path, base, sft_data):
    inputs = {"model": TINY, "data": [sft_data]}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    single = sft_stage(_sft_job(LaunchConfig(), batch_size=8), inputs, one).metrics
    zero3 = sft_stage(_sft_job(ZERO3, batch_size=4), inputs, two).metrics
    print("1 process:", [round(c["loss"], 6) for c in single["loss_curve"]])
    print("ZeRO-3, 2 processes:", [round(c["loss"], 6) for c in zero3["loss_curve"]])

    assert zero3["train_rows"] == single["train_rows"] == 24 and zero3["steps"] == single["steps"] == 6
    assert [c["step"] for c in zero3["loss_curve"]] == [c["step"] for c in single["loss_curve"]] == list(range(1, 7))
    for a, b in zip(single["loss_curve"], zero3["loss_curve"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert zero3["loss_curve"][-1]["loss"] < zero3["loss_curve"][0]["loss"] - 1.0
    assert zero3["eval_loss_after"] < zero3["eval_loss_before"]

    # Tensor by tensor, not element by element: Adam divides by sqrt(v), so an element whose true gradient is ~0
    # moves by up to lr on rounding noise alone (measured: 2 embedding entries 4e-4 apart, while every tensor is
    # within 1.1e-4 of its norm, and within 1e-3 of how far training moved it).
    gathered, reference = _check_full_folder(two / "model", base), _check_full_folder(one / "model", base)
    start = load_file(str(base / "model.safetensors"))
    assert gathered.keys() == reference.keys()
    for name, tensor in reference.items():
        difference = (gathered[name] - tensor).norm()
        assert difference <= 1e-3 * tensor.norm() and difference <= 1e-2 * (tensor - start[name]).norm(), name
    # The launcher froze the DeepSpeed config into the workers' settings; rank 0 alone wrote the outputs.
    frozen = json.loads((two / "train_config.json").read_text())
    assert frozen["deepspeed"]["zero_optimization"]["stage"] == 3
    assert "-m torch.distributed.run --nproc_per_node 2" in (two / "train.log").read_text()
    assert sorted(p.name for p in two.iterdir()) == ["metrics.json", "model", "train.log", "train_config.json"]


def test_sft_kd_under_zero3_matches_one_process(tmp_path, kd_data):
    """Token-level distillation (posttrain/train/kd.py) under ZeRO-3: the KD loss is normalised by the trained
    tokens of the whole batch across ranks, as TRL's cross-entropy is, so 2 processes follow 1 step by step."""
    inputs = {"model": TINY, "data": [kd_data]}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    kd = KDConfig(weight=0.5)
    single = sft_stage(_sft_job(LaunchConfig(), batch_size=8, kd=kd), inputs, one).metrics
    zero3 = sft_stage(_sft_job(ZERO3, batch_size=4, kd=kd), inputs, two).metrics
    assert single["kd"] == zero3["kd"] and zero3["kd"]["rows_with_teacher"] == 24 == zero3["train_rows"]
    assert zero3["kd"]["unaligned"] == 0
    for a, b in zip(single["loss_curve"], zero3["loss_curve"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert zero3["loss_curve"][-1]["loss"] < zero3["loss_curve"][0]["loss"] - 0.5
    assert zero3["eval_loss_after"] < zero3["eval_loss_before"]  # TRL's own cross-entropy on held-out answers
    assert not (two / "kd_rows").exists()


def test_sft_with_lora_through_accelerate_launch(tmp_path, base, kd_data):
    """`accelerate launch --use_deepspeed`, and a LoRA adapter gathered from the shards and merged on rank 0; with
    token-level distillation."""
    out = tmp_path / "sft"
    out.mkdir()
    launch = dataclasses.replace(ZERO3, launcher="accelerate")
    job = _sft_job(launch, batch_size=4, lora=LORA, kd=KDConfig(weight=0.5))
    m = sft_stage(job, {"model": TINY, "data": [kd_data]}, out).metrics
    assert "-m accelerate.commands.launch --num_processes 2" in (out / "train.log").read_text()
    assert m["steps"] == 6 and m["loss_curve"][-1]["loss"] < m["loss_curve"][0]["loss"]
    assert m["kd"]["rows_with_teacher"] == 24

    merged, start = _check_full_folder(out / "model", base), load_file(str(base / "model.safetensors"))
    assert merged.keys() == start.keys()  # merged: no lora_A / lora_B left
    for name, tensor in start.items():
        moved = (merged[name] - tensor).abs().max().item()
        if "q_proj" in name or "v_proj" in name:
            assert moved > 1e-3, name
        else:
            assert moved == 0.0, name
    assert not (out / "model_adapter").exists()


@pytest.fixture(scope="module")
def zero3_adapter(tmp_path_factory, sft_data) -> Path:
    """A LoRA SFT under ZeRO-3 that hands its adapter to the DPO after it (TrainJob.adapter_only, the loop's
    choice): the ranks' adapter weights gathered and written alone, no merged model."""
    out = tmp_path_factory.mktemp("sft-adapter")
    job = dataclasses.replace(_sft_job(ZERO3, batch_size=4, lora=LORA), adapter_only=True)
    m = sft_stage(job, {"model": TINY, "data": [sft_data]}, out).metrics
    assert m["loss_curve"][-1]["loss"] < m["loss_curve"][0]["loss"]
    folder = out / "model"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("tokenizer")) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"]  # PEFT's card
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == TINY
    adapter = load_file(str(folder / "adapter_model.safetensors"))
    assert len(adapter) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (lora_A, lora_B), each with its full shape
    assert all(t.numel() > 0 for t in adapter.values())
    assert all(t.abs().max() > 1e-3 for name, t in adapter.items() if "lora_B" in name)  # trained (B starts at 0)
    return folder


def test_dpo_under_zero3(tmp_path, base, zero3_adapter):
    """DPO on 2 ZeRO-3 processes, starting from the LoRA SFT adapter above: merged into the base as the ranks
    load it partitioned, to the model one process merges (its reference log-probs, row by row)."""
    from posttrain.train.dpo import Llama3DPOTrainer, build_datasets, load_policy, trl_args

    rows = [
        {"prompt_id": f"p{i}",
         "messages": [{"role": "system", "content": "You are a helpful assistant."},
                      {"role": "user", "content": f"Tell me about {topic}."}],
         "chosen": f"Here is a short answer about {topic}. Good answers are helpful.",
         "rejected": f"I don't know the answer about {topic}!!!"}
        for i, topic in enumerate(TOPICS[:12])
    ]
    pairs = tmp_path / "pairs"
    datasets.Dataset.from_list(rows).save_to_disk(str(pairs))
    out = tmp_path / "dpo"
    out.mkdir()
    dpo = DPOConfig(learning_rate=1e-3, epochs=2, batch_size=2, max_length=256, logging_steps=1, save_steps=1000,
                    eval_fraction=0.2, lr_scheduler="constant", warmup_ratio=0.0)
    inputs = {"model": str(zero3_adapter), "data": [str(pairs)]}
    m = dpo_stage(TrainJob(train=dpo, seed=0, launch=ZERO3), inputs, out).metrics

    assert m["ref_logps"] == {"train": "computed", "eval": "computed"}
    assert m["train_rows"] + m["eval_rows"] == 12 and m["steps"] == 4
    curve = m["loss_curve"]
    assert curve[-1]["loss"] < curve[0]["loss"] and curve[-1]["reward_margin"] > curve[0]["reward_margin"] + 0.5
    assert m["eval_after"]["logp_accuracy"] > m["eval_before"]["logp_accuracy"]
    trained = _check_full_folder(out / "model", base)
    start = load_file(str(base / "model.safetensors"))
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-3

    # The reference log-probs the two ranks computed (each on its half, gathered) from the adapter merged into
    # their partitions are one process's from the plainly merged model, row by row; the base alone gives others.
    stored = datasets.load_from_disk(str(out / "ref_logps" / "train"))
    settings = json.loads((out / "train_config.json").read_text())
    assert settings["model"] == str(zero3_adapter)
    train_ds, _ = build_datasets(settings["data"], settings["eval_fraction"])
    single = {}
    for name, model_spec in (("merged", str(zero3_adapter)), ("base", TINY)):
        model, tokenizer, _ = load_policy({**settings, "model": model_spec})
        single[name] = Llama3DPOTrainer(
            model=model, args=trl_args(settings, tmp_path / name, disable_tqdm=True), train_dataset=train_ds,
            processing_class=tokenizer, ref_store=tmp_path / f"{name}_ref").train_dataset
    assert stored["chosen_ids"] == single["merged"]["chosen_ids"]
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        assert stored[col] == pytest.approx(single["merged"][col], rel=1e-5)
        assert stored[col] != pytest.approx(single["base"][col], rel=1e-3)


def test_rm_under_zero3(tmp_path, base):
    from posttrain.train.rm import preference_pairs, split_pairs
    from reward.rm_scorer import NORM_FILE, RewardModelScorer

    rng = random.Random(0)
    rows = []
    for i in range(40):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        rows.append({"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                     "chosen": f"Thank you for asking! It is {a + b}. Have a nice day.",
                     "rejected": f"Ugh. {a + b}. Go away."})
    prefs = tmp_path / "prefs"
    datasets.Dataset.from_list(rows).save_to_disk(str(prefs))
    out = tmp_path / "rm"
    out.mkdir()
    rm = RMConfig(learning_rate=3e-3, epochs=1, batch_size=4, max_length=128, logging_steps=1, save_steps=1000,
                  eval_fraction=0.2)
    result = rm_stage(TrainJob(train=rm, seed=0, launch=ZERO3), {"model": TINY, "data": [str(prefs)]}, out)
    m = result.metrics
    assert result.rows == m["train_pairs"] and m["train_pairs"] + m["eval_pairs"] == 40
    assert m["eval_accuracy_after"] >= 0.8 and m["loss_curve"][-1]["loss"] < m["loss_curve"][0]["loss"]

    from transformers import AutoModelForSequenceClassification

    _check_full_folder(out / "model", base, AutoModelForSequenceClassification)
    # The normalisation statistics were computed by the two ranks on the trained shards; the saved folder, scored
    # in one process, reproduces them: its normalised scores of the training responses have mean 0 and std 1.
    stats = json.loads((out / "model" / NORM_FILE).read_text())
    train_pairs, _ = split_pairs(preference_pairs([str(prefs)], rm.min_difference)[0], rm.eval_fraction)
    responses = {(json.dumps(p["messages"]), text) for p in train_pairs for text in (p["chosen"], p["rejected"])}
    assert stats["responses_scored"] == len(responses)
    scorer = RewardModelScorer(str(out / "model"), normalize=True, max_length=128)
    scores = scorer([{"messages": json.loads(msgs)} for msgs, _ in responses], [text for _, text in responses])
    mean = sum(scores) / len(scores)
    std = (sum((s - mean) ** 2 for s in scores) / len(scores)) ** 0.5
    assert mean == pytest.approx(0.0, abs=1e-4) and std == pytest.approx(1.0, abs=1e-4)
