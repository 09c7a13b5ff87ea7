"""SFT stage: a thin wrapper on TRL's SFTTrainer, run as its own process.

`python -m posttrain.train.sft train_config.json` trains on generated rows (prompt messages + completion text)
with the loss on the assistant's completion only (TRL prompt-completion format: the prompt is masked whatever
the chat template is), optionally through a LoRA adapter merged on save. It resumes from the last Trainer
checkpoint in its folder, measures the loss on held-out prompts before and after training, and leaves a plain
Hugging Face folder in `model/` (or, with `TrainJob.adapter_only`, the LoRA adapter alone, which the next stage
merges into its base as it loads).

The driver side, `sft_stage`, builds the frozen settings and launches this module (one process, or one per
rank under torchrun / accelerate launch with DeepSpeed ZeRO-3: see posttrain/train/common.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from posttrain.config import TrainJob
from posttrain.rundir import Inputs, StageResult
from posttrain.train import common
from posttrain.train.launch import launch_stage


def sft_stage(job: TrainJob, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `job.train`: the recipe's `sft` section (SFTConfig); `inputs`: `model` (spec of the
    checkpoint to start from), `data` (a list of datasets in the generations format: this round's best-of-K
    rows and, with `sft.accumulate`, earlier rounds') and `user_data` (the local paths of `sft.data`'s sources, for
    the run directory's fingerprints; the sources are read from `job.train.data` into `user_data/`).
    Output: `model/` (HF folder)."""
    import datasets

    from posttrain.errors import PosttrainError
    from posttrain.models import resolve_model

    data, user_data = common.with_user_data(job, "sft", "sft", inputs.get("data", []), out)
    if sum(len(datasets.load_from_disk(p)) for p in data) == 0:
        raise PosttrainError(f"no SFT rows in {data}: every response was filtered out, unscored or below "
                             f"select.min_score (the manifest's filter and select entries count why)")
    sft = asdict(job.train)
    settings = {
        **{k: v for k, v in sft.items() if k not in ("enabled", "init", "accumulate", "seeds", "data")},
        "model": resolve_model(inputs["model"]),
        "data": data,
        "adapter_only": job.adapter_only,
        # the spec (a local folder made absolute), which an adapter_only folder names as its base
        "base": str(Path(inputs["model"]).resolve()) if Path(inputs["model"]).exists() else inputs["model"],
    }
    first, metrics = launch_stage("posttrain.train.sft", job, settings, out)
    if user_data:
        metrics["user_data"] = user_data
    return StageResult(outputs={"model": "model"}, rows=first["train_rows"], metrics=metrics)


# ---- the training process -----------------------------------------------------------------------------------


def build_datasets(paths: list[str], eval_fraction: float):
    """Generation rows -> TRL conversational prompt-completion rows, split into train and held-out sets; also the
    held-out flag of each row."""
    ds = common.load_datasets(paths, columns=("prompt_id", "messages", "text"))
    ds = ds.map(
        lambda r: {"prompt": r["messages"], "completion": [{"role": "assistant", "content": r["text"]}]},
        remove_columns=ds.column_names,
        with_indices=False,
        desc="SFT rows",
        load_from_cache_file=False,
    ).add_column("prompt_id", ds["prompt_id"])
    held = common.held_out(ds["prompt_id"], eval_fraction)
    train = ds.select([i for i, h in enumerate(held) if not h]).remove_columns("prompt_id")
    evals = ds.select([i for i, h in enumerate(held) if h]).remove_columns("prompt_id")
    return train, (evals if len(evals) else None), held


def train(settings: dict) -> dict:
    from trl import SFTConfig, SFTTrainer

    from posttrain.timing import Phases

    phases = Phases()
    distributed = common.setup(settings)  # before the trainer's config; the model loads after it
    out = Path(settings["output_dir"])
    trainer_dir = out / "trainer"
    with phases("load"):  # data, model, tokenizer, the trainer (tokenizing its datasets)
        train_ds, eval_ds, held = build_datasets(settings["data"], settings["eval_fraction"])
        kd = settings.get("kd") or {"weight": 0.0}
        args = SFTConfig(
            **common.trainer_args(settings, trainer_dir),
            max_length=settings["max_length"],
            packing=settings.get("packing", False),
            dataset_num_proc=None,
            disable_tqdm=False,
            # the prompt is never trained on, nor counted in the held-out loss (TRL infers it from a train set in
            # prompt-completion form; KD's train set comes tokenized, with its labels)
            completion_only_loss=True,
            # KD rows carry the teacher's log-probs to the collator
            **({"remove_unused_columns": False} if kd["weight"] else {}),
            **distributed,
        )
        model, tokenizer, peft_config = common.load_policy(settings)
        extra: dict = {}
        trainer_class = SFTTrainer
        if kd["weight"]:  # token-level distillation (posttrain/train/kd.py)
            from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

            from posttrain.train import kd as distil

            rows = len(train_ds)
            train_ds, kd_counts = distil.build_train(settings["data"], held, tokenizer, settings["max_length"],
                                                      out / "kd_rows", vocab=model.config.vocab_size)
            assert len(train_ds) == rows, (len(train_ds), rows)
            trainer_class = distil.trainer_class()
            extra = {"kd_weight": kd["weight"], "kd_temperature": kd["temperature"],
                     "data_collator": distil.Collator(DataCollatorForLanguageModeling(tokenizer.pad_token_id))}
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            **extra,
        )
    metrics: dict = {"train_rows": len(train_ds), "eval_rows": len(eval_ds) if eval_ds is not None else 0,
                     "train_sequences": len(trainer.train_dataset)}  # fewer than train_rows when packed
    if kd["weight"]:
        metrics["kd"] = {**kd, **kd_counts}
    if eval_ds is not None:
        with phases("evaluate"):
            metrics["eval_loss_before"] = common.evaluate_before_training(trainer)["eval_loss"]
    with phases("train"):
        metrics |= common.train_resuming(trainer, trainer_dir)
    metrics["loss_curve"] = [
        {"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h
    ]
    if eval_ds is not None:
        with phases("evaluate"):
            metrics["eval_loss_after"] = trainer.evaluate()["eval_loss"]

    with phases("save"):
        if peft_config is not None and settings.get("adapter_only"):  # the DPO stage after it merges it
            common.save_adapter(trainer, out / "model", tokenizer, settings["base"])
        else:
            common.save_model(trainer, out / "model", tokenizer, merge_lora=peft_config is not None,
                              dtype=settings.get("dtype") or "auto")
    metrics["seconds"] = phases.seconds()
    if common.is_main():
        if not settings["keep_checkpoints"]:
            shutil.rmtree(trainer_dir, ignore_errors=True)
        shutil.rmtree(out / "kd_rows", ignore_errors=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> None:
    common.main(train, "posttrain.train.sft", argv)


if __name__ == "__main__":
    main()
