"""What the three training processes (sft, dpo, rm) share: the distributed set-up, the rank that writes files,
the by-prompt held-out split, and reading input datasets.

One process (`launch.launcher=direct`) needs none of the distributed part: `setup` returns no extra trainer
arguments and `is_main` is true. Under `torchrun` / `accelerate launch` with a DeepSpeed config, every rank runs
the same code; the HF/TRL trainers then need, before their config is built (DESIGN.md, "CPU facts"):
ACCELERATE_USE_DEEPSPEED, a PartialState built first (gloo on CPU) that the trainer reuses
(`use_configured_state`), and the model loaded after the config, so ZeRO-3 partitions it while it loads.
Work that runs a forward pass (evaluate, reference log-probs, reward scoring) runs on every rank: under ZeRO-3
each forward gathers the weights from all ranks. Only global rank 0 writes files.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import warnings
from pathlib import Path

# TRL 1.16 reads `model.is_gradient_checkpointing`, which transformers deprecates: noise in every stage's log.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def main(train, module: str, argv: list[str] | None = None) -> None:
    """Entry point of a training process, `python -m <module> TRAIN_CONFIG.json`: `train(settings)` on every rank,
    then `finish()`."""
    if "LOCAL_RANK" in os.environ:  # a worker of torchrun / accelerate launch
        from posttrain.train.launch import die_with_parent

        # The launchers start their workers in sessions of their own and leave them running when killed: the
        # driver's death kills the launcher (launch.py), and the launcher's death this worker.
        die_with_parent()
    from torch.distributed.elastic.multiprocessing.errors import record

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(f"usage: python -m {module} TRAIN_CONFIG.json")
    # `record`: under torchrun / accelerate, the launcher's failure summary (the end of the stage's log) then
    # shows the worker's exception instead of "error_file: <N/A>".
    record(train)(json.loads(Path(argv[0]).read_text()))
    finish()


def setup(settings: dict) -> dict:
    """Call first in a training process, before any TrainingArguments is built. `settings["deepspeed"]` (the
    DeepSpeed config dict the launcher froze into the settings, or None). Returns extra TrainingArguments fields:
    {} without DeepSpeed, else the DeepSpeed config and `use_configured_state`."""
    ds_config = settings.get("deepspeed")
    if not ds_config:
        return {}
    if "LOCAL_RANK" not in os.environ:
        raise RuntimeError(
            "the settings name a DeepSpeed config, but this process was not started by torchrun or accelerate "
            "launch (set launch.launcher=torchrun or accelerate)"
        )
    import torch
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(**({} if torch.cuda.is_available() else {"backend": "gloo"}))
    # A copy: the trainer fills the config's "auto" values in place.
    return {"deepspeed": copy.deepcopy(ds_config), "accelerator_config": {"use_configured_state": True}}


def last_complete_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest `checkpoint-N` folder the Trainer finished writing (its trainer_state.json, written last, is there
    and parses), or None. A process killed while a checkpoint was being written leaves a newer folder without it:
    resuming from that one would fail every rerun."""
    found = []
    for folder in trainer_dir.glob("checkpoint-*") if trainer_dir.exists() else []:
        step = folder.name.removeprefix("checkpoint-")
        if folder.is_dir() and step.isdigit():
            found.append((int(step), folder))
    for _, folder in sorted(found, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return folder
    return None


def train_resuming(trainer, trainer_dir: Path) -> dict:
    """`trainer.train()`, resumed from the last complete checkpoint in `trainer_dir` when there is one. Returns the
    metrics every training stage records: resumed_from (the checkpoint's folder name or None), train_loss (the mean
    of every logged training loss when resumed: the Trainer's own figure then covers only the steps after the
    checkpoint, and is 0.0 when none were left), steps."""
    last = last_complete_checkpoint(trainer_dir)
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    loss = result.training_loss
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if last is not None and logged:
        loss = sum(logged) / len(logged)
    return {"resumed_from": last.name if last else None, "train_loss": loss, "steps": result.global_step}


def is_main() -> bool:
    """True in the process that writes files: global rank 0, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def finish() -> None:
    """End of a training process: wait for every rank, then close the process group (a no-op for one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def evaluate_before_training(trainer) -> dict:
    """`trainer.evaluate()` before `trainer.train()`, on every rank. Under DeepSpeed, evaluate() wraps the model in
    an inference engine that train() would then take for its own and never set up for training (transformers
    5.23): the engine is dropped again, and train() builds the training one."""
    metrics = trainer.evaluate()
    if trainer.is_deepspeed_enabled:
        trainer.model_wrapped, trainer.deepspeed = trainer.model, None
    return metrics


def save_model(trainer, model_dir: Path, tokenizer, merge_lora: bool, dtype: str = "auto") -> None:
    """Write the trained model as a plain HF folder (full weights, a LoRA adapter merged) plus the tokenizer.
    Called on every rank: under ZeRO-3 the weights are gathered from all of them (the DeepSpeed config's
    `stage3_gather_16bit_weights_on_model_save`) and rank 0 writes."""
    if not trainer.is_deepspeed_enabled:
        if is_main():
            final = trainer.model.merge_and_unload() if merge_lora else trainer.model
            final.save_pretrained(str(model_dir), safe_serialization=True)
            tokenizer.save_pretrained(str(model_dir))
        barrier()
        return
    if merge_lora:  # gather the adapter, then merge it into a fresh full copy of the base model on rank 0
        adapter_dir = model_dir.with_name(model_dir.name + "_adapter")
        trainer.save_model(str(adapter_dir))
        if is_main():
            _merge_adapter(adapter_dir, model_dir, tokenizer, dtype)
    else:
        trainer.save_model(str(model_dir))
        if is_main():
            (model_dir / "training_args.bin").unlink(missing_ok=True)
            tokenizer.save_pretrained(str(model_dir))
    barrier()


def save_adapter(trainer, model_dir: Path, tokenizer, base: str) -> None:
    """Write the trained LoRA adapter alone (PEFT's folder: adapter_config.json, adapter_model.safetensors) plus the
    tokenizer, the config naming `base`, the model spec training started from (not the cache folder it resolved
    to; a local folder as an absolute path); `posttrain.models.load_causal_lm` loads it merged into that base.
    Called on every rank: under DeepSpeed the Trainer gathers the adapter's weights (only the trainable ones under
    ZeRO-3, never the base) and rank 0 writes; nothing the size of the model is gathered, merged or written."""
    if trainer.is_deepspeed_enabled:
        trainer.save_model(str(model_dir))
    elif is_main():
        trainer.model.save_pretrained(str(model_dir), safe_serialization=True)
    if is_main():
        (model_dir / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(model_dir))
        config = model_dir / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": base}, indent=2))
    barrier()


def _merge_adapter(adapter_dir: Path, model_dir: Path, tokenizer, dtype: str) -> None:
    import shutil

    from peft import AutoPeftModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Training is over: load the base model whole in this process, not partitioned across ranks by ZeRO-3.
    unset_hf_deepspeed_config()
    weights, _ = precision(dtype, deepspeed=True)  # the merged model is saved as ZeRO-3 trained it
    merged = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=weights).merge_and_unload()
    merged.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    shutil.rmtree(adapter_dir, ignore_errors=True)


def held_out(keys: list[str], fraction: float) -> list[bool]:
    """Which rows to hold out, by prompt (`keys`: one prompt key per row), not by row: all rows of a prompt fall
    on the same side. At least one prompt is held out when `fraction` > 0 and there are two or more, and at least
    one prompt is always trained on (a single prompt is never held out)."""
    held = [int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) / 16**8 < fraction for k in keys]
    several = len(set(keys)) > 1
    if fraction > 0 and not any(held) and several:
        held = [k == keys[0] for k in keys]
    if held and all(held):
        held = [several and k != keys[0] for k in keys]
    return held


def load_datasets(paths: list[str], columns: tuple[str, ...] | None = None):
    """The `datasets` folders in `paths`, concatenated, in memory: a map on a dataset loaded from disk would write
    its cache files into the input stage's finished folder. `columns`: keep only these (stage outputs and a
    user's data carry different extra columns), cast to the first folder's types. A folder lacking one raises
    ValueError naming it."""
    import datasets

    parts = []
    for p in paths:
        ds = datasets.load_from_disk(p, keep_in_memory=True)
        if columns is not None:
            missing = sorted(set(columns) - set(ds.column_names))
            if missing:
                raise ValueError(f"{p} lacks columns {missing}")
            ds = ds.select_columns(list(columns))
            if parts:
                ds = ds.cast(parts[0].features)
        parts.append(ds)
    return datasets.concatenate_datasets(parts)


def with_user_data(job, key: str, kind: str, data: list[str], out: Path) -> tuple[list[str], dict]:
    """Driver side: a stage's data folders plus the recipe's own sources (`<key>.data`, posttrain.sources), read,
    checked, mixed by weight with the run's seed and saved as `out/user_data/`. Returns the folders to train on
    and, per source, its counts for the manifest ({} without sources)."""
    import shutil

    from posttrain.sources import mix, parse_sources, save

    sources = parse_sources(job.train.data, f"{key}.data")
    if not sources:
        return list(data), {}
    rows, report = mix(sources, kind, job.seed)
    folder = out / "user_data"
    shutil.rmtree(folder, ignore_errors=True)
    save(rows, folder)
    return [*data, str(folder)], report


def precision(dtype: str, deepspeed: bool = False):
    """(dtype to load the weights in, TrainingArguments precision flags) for a recipe's `model.dtype`
    (posttrain.models.torch_dtype: "auto" is bf16 on a GPU that has it, fp32 elsewhere). bfloat16 trains with
    bf16=True: under DeepSpeed the weights load in bf16 (ZeRO keeps the fp32 master copy and optimizer state);
    without it they stay fp32 under bf16 autocast, since AdamW steps of lr 1e-5 vanish in bf16 weights. float16
    likewise keeps fp32 weights under fp16 autocast (the gradient scaler cannot unscale fp16 gradients)."""
    import torch

    from posttrain.models import torch_dtype

    chosen = torch_dtype(dtype)
    flags = {"bf16": chosen == torch.bfloat16, "fp16": chosen == torch.float16}
    return (torch.bfloat16 if flags["bf16"] and deepspeed else torch.float32), flags


def precision_of(settings: dict):
    """`precision` for a training process's frozen settings (`dtype`, and `deepspeed` when the launcher froze one)."""
    return precision(settings.get("dtype") or "auto", deepspeed=bool(settings.get("deepspeed")))


def attention(settings: dict) -> dict:
    """from_pretrained keywords for the stage's `attn_implementation` ({} for transformers' choice)."""
    chosen = settings.get("attn_implementation")
    return {"attn_implementation": chosen} if chosen else {}


def load_policy(settings: dict):
    """(causal LM in the stage's precision, its tokenizer with a pad token, a peft LoraConfig or None) from a
    training process's frozen settings (`model`, `dtype`, `lora`)."""
    from peft import LoraConfig as PeftLoraConfig

    from posttrain.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(settings["model"])
    weights, _ = precision_of(settings)
    model = load_causal_lm(settings["model"], dtype=weights, **attention(settings))
    lora = settings["lora"]
    peft_config = None
    if lora["enabled"]:
        peft_config = PeftLoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=list(lora["target_modules"]),
            task_type="CAUSAL_LM",
        )
    return model, tokenizer, peft_config


def trainer_args(settings: dict, output_dir: str | Path) -> dict:
    """TrainingArguments keywords every stage shares, from its frozen settings (TrainingConfig fields + `seed`
    and `dtype`): schedule, batch, checkpointing for in-stage resume, and precision (`precision`; activation
    checkpointing on GPU). Prints the precision once, from the main process."""
    import torch

    gpu = torch.cuda.is_available()
    dtype = settings.get("dtype") or "auto"
    weights, flags = precision_of(settings)
    if is_main():
        mode = "bf16" if flags["bf16"] else "fp16 autocast" if flags["fp16"] else "fp32"
        print(f"posttrain: training in {mode} on {'GPU' if gpu else 'CPU'} (model.dtype={dtype}, "
              f"weights {str(weights).removeprefix('torch.')})", flush=True)
    return dict(
        output_dir=str(output_dir),
        learning_rate=settings["learning_rate"],
        num_train_epochs=settings["epochs"],
        max_steps=settings.get("max_steps", -1),
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"],
        gradient_accumulation_steps=settings["grad_accum"],
        lr_scheduler_type=settings["lr_scheduler"],
        # transformers 5: a value below 1 is a ratio of the steps
        warmup_steps=settings.get("warmup_steps") or settings["warmup_ratio"],
        weight_decay=settings["weight_decay"],
        logging_steps=settings["logging_steps"],
        save_strategy="steps",
        save_steps=settings["save_steps"],
        save_total_limit=2,  # the last checkpoint survives a crash while the next one is written
        eval_strategy="no",
        report_to=settings["report_to"],
        run_name=settings.get("run_name"),  # round_N/stage[/seed_S]: how wandb, trackio and mlflow name the run
        # Trackio has no groups: one project per run directory keeps two runs' round_1/sft apart
        **({"project": settings["run_group"]} if settings.get("run_group") else {}),
        seed=settings["seed"],
        use_cpu=not gpu,
        **flags,
        activation_checkpointing=gpu if settings.get("gradient_checkpointing") is None
        else settings["gradient_checkpointing"],
        **{k: settings[k] for k in ("optim", "max_grad_norm") if settings.get(k) is not None},
    )
