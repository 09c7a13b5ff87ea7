"""The training knobs TRL users expect reach TRL's configs, and packing packs."""

import dataclasses

import datasets

from posttrain.config import DPOConfig, SFTConfig

KNOBS = dict(optim="adafactor", max_grad_norm=0.5, warmup_steps=3, gradient_checkpointing=True,
             attn_implementation="eager")


def _settings(cfg, **extra) -> dict:
    return {**dataclasses.asdict(cfg), "seed": 0, "dtype": "auto", "deepspeed": None, **extra}


def test_knobs_reach_the_trainer_arguments_and_dpo_loss(tmp_path):
    from posttrain.train.dpo import trl_args

    args = trl_args(_settings(DPOConfig(loss_type="robust", label_smoothing=0.1, **KNOBS)), tmp_path)
    assert (args.optim, args.max_grad_norm, args.warmup_steps) == ("adafactor", 0.5, 3)
    assert args.activation_checkpointing is True
    assert args.loss_type == ["robust", "sft"] and args.loss_weights == [1.0, 0.2] and args.label_smoothing == 0.1
    named = trl_args(_settings(DPOConfig(), run_name="round_1/dpo", run_group="myrun"), tmp_path)
    assert (named.run_name, named.project) == ("round_1/dpo", "myrun")  # trackio: one project per run directory
    default = trl_args(_settings(DPOConfig()), tmp_path)  # the Llama 3 loss, transformers' own defaults
    assert default.loss_type == ["sigmoid", "sft"] and default.max_grad_norm == 1.0 and default.warmup_steps == 0.1


def test_sft_packs_short_examples_and_loads_the_chosen_attention(tmp_path):
    from posttrain.train import common, sft

    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Say {i}"}], "text": f"Number {i}."}
            for i in range(16)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    cfg = SFTConfig(batch_size=2, max_length=128, logging_steps=1, max_steps=2, eval_fraction=0.0, packing=True,
                    **KNOBS)
    settings = _settings(cfg, model="tiny://layers=2,hidden=64,seed=0", data=[str(tmp_path / "data")],
                         output_dir=str(tmp_path / "out"))
    metrics = sft.train(settings)
    assert metrics["train_rows"] == 16 and metrics["train_sequences"] < 8 and metrics["steps"] == 2
    assert set(metrics["seconds"]) == {"load", "train", "save"}  # where the stage's time went
    model, _, _ = common.load_policy(settings)
    assert model.config._attn_implementation == "eager"
