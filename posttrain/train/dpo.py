"""DPO stage: the Llama 3 recipe (paper section 4.1.4) on TRL's DPOTrainer, run as its own process.

`python -m posttrain.train.dpo train_config.json` trains the policy on chosen/rejected pairs with
  * the sigmoid DPO loss (beta 0.1) plus an NLL term on the chosen response (weight 0.2), lr 1e-5;
  * header and termination tokens masked out of the DPO log-ratios of both responses (TRL does not do this);
  * reference log-probs computed once with the initial policy, stored with the pairs in `ref_logps/{train,eval}`
    (`datasets` folders) and reused by a resumed or repeated run, so no reference model stays in memory.
It resumes from the last Trainer checkpoint in its folder, measures held-out pairs (split by prompt) before and
after training, and leaves a plain Hugging Face folder in `model/` (a LoRA adapter, if any, merged).

How the masking hooks into TRL 1.16 (`Llama3DPOTrainer`):
  * data: `FormatMaskingCollator` wraps TRL's collator and adds `format_mask`, the formatting tokens inside each
    completion (`posttrain.chat.formatting_mask`, so any chat template works). TRL hands every batch key it does not
    know to the model's forward, so the mask travels with the batch;
  * model: TRL scores tokens with a fused LM head patched onto `model.forward`, returning per-token log-probs. Our
    wrapper of that forward takes `format_mask` and takes the formatting tokens out of the per-sequence sums TRL
    builds the DPO log-ratios from (policy, stored reference and resident reference alike).
The NLL term keeps the formatting tokens: the conflict the paper describes comes from the contrastive term pushing
the same tokens up in the chosen and down in the rejected response; the NLL term only pushes the chosen response
up, and keeping <|eot_id|> in it is what keeps the model stopping where good answers stop (as SFT taught it) while
DPO moves the likelihood of everything else. `mask_format_tokens=False` gives TRL's plain loss.

TRL 1.16's own `precompute_ref_log_probs` computes the reference log-probs with the policy before training but
caches them in a temporary `datasets` cache file (or next to the input data) keyed by a fingerprint, and recomputes
them whenever that file is gone. `Llama3DPOTrainer` keeps TRL's computation and stores its result in the stage
folder, keyed by the tokens, the model's hash and the masking, and reads it back on the next run.

The driver side, `dpo_stage`, builds the frozen settings and launches this module (one process, or one per
rank under torchrun / accelerate launch with DeepSpeed ZeRO-3: see posttrain/train/common.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from posttrain.config import DPOConfig, TrainJob  # noqa: F401 - DPOConfig: the stage's settings, for callers
from posttrain.rundir import Inputs, StageResult
from posttrain.train import common
from posttrain.train.launch import launch_stage

PAIR_COLUMNS = ("prompt_id", "messages", "chosen", "rejected")
TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def dpo_stage(job: TrainJob, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `job.train`: the recipe's `dpo` section (DPOConfig); `inputs`: `model` (spec of the SFT
    policy, which is also the reference), `data` (a list of pairs `datasets` folders with prompt_id, messages,
    chosen, rejected) and `user_data` (the local paths of `dpo.data`'s sources, read from `job.train.data`).
    Output: `model/` (HF folder); `ref_logps/` keeps the pairs with their reference log-probs (computed once,
    shared by the seeds of `dpo.seeds`).
    Rows: train and held-out pairs."""
    import datasets

    from posttrain.errors import PosttrainError
    from posttrain.models import resolve_model

    data, user_data = common.with_user_data(job, "dpo", "pairs", inputs.get("data", []), out)
    if sum(len(datasets.load_from_disk(p)) for p in data) == 0:
        raise PosttrainError(f"no DPO pairs in {data}: every prompt's responses were tied, identical or "
                             f"too close (the manifest's select entry counts why); set dpo.enabled=false to skip DPO")
    settings = {
        **{k: v for k, v in asdict(job.train).items() if k not in ("enabled", "seeds", "data")},
        "model": resolve_model(inputs["model"]),
        "data": data,
        # One store for all of `dpo.seeds`: the pairs and the reference (this round's SFT model) are the same for
        # every seed, so the seeds after the first read the log-probs back (checked against the store's key).
        "ref_store": str(out / "ref_logps"),
    }
    first, metrics = launch_stage("posttrain.train.dpo", job, settings, out)
    if user_data:
        metrics["user_data"] = user_data
    return StageResult(
        outputs={"model": "model"},
        rows={"train_pairs": first["train_rows"], "eval_pairs": first["eval_rows"]},
        metrics=metrics,
    )


# ---- data ----------------------------------------------------------------------------------------------------


def build_datasets(paths: list[str], eval_fraction: float):
    """Pairs rows -> TRL conversational preference rows (prompt, chosen, rejected as message lists, plus prompt_id),
    split by prompt into train and held-out sets (held-out is None when empty). Other columns are dropped."""
    ds = common.load_datasets(paths, columns=PAIR_COLUMNS)
    ds = ds.map(
        lambda r: {
            "prompt": r["messages"],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        },
        remove_columns=[c for c in ds.column_names if c != "prompt_id"],
        desc="DPO pairs",
        keep_in_memory=True,
    )
    held = common.held_out(ds["prompt_id"], eval_fraction)
    train = ds.select([i for i, h in enumerate(held) if not h], keep_in_memory=True)
    evals = ds.select([i for i, h in enumerate(held) if h], keep_in_memory=True)
    return train, (evals if len(evals) else None)


@dataclass
class FormatMaskingCollator:
    """TRL's preference collator plus `format_mask`: True at the formatting tokens (headers, end of turn/message,
    as `posttrain.chat.formatting_mask` finds them for the tokenizer's template) that lie inside a completion."""

    base: Any  # trl DataCollatorForPreference
    tokenizer: Any
    tokens: Any  # posttrain.chat.FormatTokens

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        from posttrain.chat import formatting_mask

        batch = self.base(examples)
        rows = [formatting_mask(self.tokenizer, ids, self.tokens) for ids in batch["input_ids"].tolist()]
        completion = batch["completion_mask"].bool()
        if completion[:, :2].any():  # `_drop_format_logps` parks a correction at position 0
            raise ValueError("a DPO completion starts at the sequence's first two tokens: the prompt is empty")
        batch["format_mask"] = torch.tensor(rows, dtype=torch.bool) & completion
        return batch


def _drop_format_logps(model) -> None:
    """Wrap the fused-LM-head forward TRL patched onto `model` so that formatting tokens (`format_mask`) do not count
    in any per-sequence sum of the per-token log-probs, while staying in place for the NLL term.

    TRL 1.16 builds the DPO log-ratios from `log_probs.sum(dim=1)` over all positions, and its "sft" (NLL) term from
    the mean over completion positions. So the formatting log-probs stay where they are and their sum is subtracted
    at position 0, which scores a prompt token and lies outside every completion: the sums lose the formatting
    tokens (value and gradient), the NLL mean keeps them."""
    import torch
    from peft import PeftModel

    target = model.get_base_model() if isinstance(model, PeftModel) else model
    if getattr(target, "_posttrain_format_masked", False):
        return
    fused_forward = target.forward

    @functools.wraps(fused_forward)
    def forward(*args, format_mask=None, **kwargs):
        out = fused_forward(*args, **kwargs)
        if format_mask is None or not kwargs.get("fused_lm_head"):
            return out
        log_probs = out.log_probs  # [:, j] scores token j + 1
        fmt = format_mask[:, 1:].to(log_probs.device)[:, -log_probs.size(1) :]
        dropped = log_probs.masked_fill(~fmt, 0.0).sum(dim=1, keepdim=True)
        out.log_probs = torch.cat([log_probs[:, :1] - dropped, log_probs[:, 1:]], dim=1)
        return out

    target.forward = forward
    target._posttrain_format_masked = True


def _token_fingerprint(dataset) -> str:
    """Hash of the token ids TRL trains on (lengths and values of each token column)."""
    import pyarrow.compute as pc

    h = hashlib.sha256()
    for table in dataset.select_columns(list(TOKEN_COLUMNS)).with_format("arrow").iter(batch_size=10_000):
        for col in TOKEN_COLUMNS:
            h.update(pc.list_value_length(table[col]).to_numpy(zero_copy_only=False).tobytes())
            h.update(pc.list_flatten(table[col]).to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def __getattr__(name: str):
    # `Llama3DPOTrainer` is built on first use: TRL is slow to import and the driver imports this module too.
    if name == "Llama3DPOTrainer":
        return _llama3_dpo_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _llama3_dpo_trainer_class():
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class Llama3DPOTrainer(DPOTrainer):
        """TRL's DPOTrainer with formatting tokens masked out of the DPO log-ratios and the reference log-probs
        stored in `ref_store/<split>` (a `datasets` folder), reused while tokens, model and masking match.

        Extra keyword arguments: `mask_format_tokens` (default True; the trainer then builds its own collator, so
        pass no `data_collator`) and `ref_store` (a folder; None keeps TRL's temporary cache). Use it with
        `precompute_ref_log_probs=True` to train without a resident reference model."""

        def __init__(self, *args, mask_format_tokens: bool = True, ref_store: str | Path | None = None, **kwargs):
            from posttrain.chat import format_tokens
            from posttrain.models import pad_with_eos

            self._ref_store = Path(ref_store) if ref_store is not None else None
            self._mask_format_tokens = mask_format_tokens
            self.ref_logps_source: dict[str, str] = {}  # split -> "computed" | "stored"
            self._gathered_hash: str | None = None
            if mask_format_tokens:
                if kwargs.get("data_collator") is not None:
                    raise ValueError("mask_format_tokens=True builds its own data collator; pass no data_collator")
                tok, targs = kwargs["processing_class"], kwargs["args"]
                pad_with_eos(tok)
                base = DataCollatorForPreference(
                    pad_token_id=tok.pad_token_id,
                    max_length=targs.max_length,
                    truncation_mode=targs.truncation_mode,
                    pad_to_multiple_of=targs.pad_to_multiple_of,
                )
                kwargs["data_collator"] = FormatMaskingCollator(base=base, tokenizer=tok, tokens=format_tokens(tok))
            super().__init__(*args, **kwargs)
            self._wrap_forwards()

        def _wrap_forwards(self) -> None:
            # Must follow TRL's fused-LM-head patch, which DPOTrainer.__init__ applies right before it precomputes
            # the reference log-probs: hence called from both places.
            if self._mask_format_tokens:
                for m in (self.model, self.ref_model):
                    if m is not None:
                        _drop_format_logps(self.accelerator.unwrap_model(m))

        def _precompute_ref_logps(self, dataset, name, batch_size):
            self._wrap_forwards()
            if self._ref_store is None:
                self.ref_logps_source[name] = "computed"
                return super()._precompute_ref_logps(dataset, name, batch_size)
            import datasets

            folder = self._ref_store / name
            key = {
                "tokens": _token_fingerprint(dataset),
                "model_hash": self._model_hash(),
                "mask_format_tokens": self._mask_format_tokens,
                "max_length": self.args.max_length,
                "truncation_mode": self.args.truncation_mode,
                "precision": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "fp32",  # autocast
            }
            key_file = folder / "posttrain_ref_key.json"
            if key_file.is_file() and json.loads(key_file.read_text()) == key:
                self.ref_logps_source[name] = "stored"
                print(f"reference log-probs for {name}: reusing {folder}", flush=True)
                return datasets.load_from_disk(str(folder))
            self.ref_logps_source[name] = "computed"
            staged = folder.with_name(f".{name}.tokens")
            if self.accelerator.num_processes > 1:
                # TRL writes the log-probs next to the dataset's cache files, or, for a dataset in memory, into a
                # temporary folder of each process's own, where the other ranks cannot read them back.
                if self.accelerator.is_main_process:
                    shutil.rmtree(staged, ignore_errors=True)
                    dataset.save_to_disk(str(staged))
                self.accelerator.wait_for_everyone()
                dataset = datasets.load_from_disk(str(staged))
            computed = super()._precompute_ref_logps(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                tmp = folder.with_name(f".{name}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                computed.save_to_disk(str(tmp))
                (tmp / "posttrain_ref_key.json").write_text(json.dumps(key, indent=2))  # written last
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                shutil.rmtree(staged, ignore_errors=True)
            return datasets.load_from_disk(str(folder))  # memory-mapped

        def _model_hash(self) -> str:
            """The reference's weights, hashed. TRL's hash (`hash_module`) covers every parameter: with a LoRA
            adapter that includes its randomly initialised factors, different for every seed, though TRL's
            reference is the model with the adapter switched off; and under ZeRO-3 a rank's state_dict holds empty
            shards (the key would not change with the weights). In those two cases the base weights are hashed
            here instead, one tensor at a time (gathered under ZeRO-3, on every rank)."""
            plugin = self.accelerator.state.deepspeed_plugin
            zero3 = plugin is not None and plugin.zero_stage == 3
            # A PeftModel whose reference is its own "ref" adapter (TRL's other LoRA path) keeps TRL's hash.
            own_ref = "ref" in getattr(self.model, "peft_config", {})
            lora = not own_ref and any("lora_" in name for name, _ in self.model.named_parameters())
            if not (zero3 or lora):
                return self._precompute_model_hash
            if self._gathered_hash is None:
                import contextlib

                def gather(param):  # the whole tensor on every rank under ZeRO-3; as it is otherwise
                    if not zero3:
                        return contextlib.nullcontext()
                    import deepspeed

                    return deepspeed.zero.GatheredParameters([param])

                h = hashlib.sha256()
                for name, param in sorted(self.model.named_parameters(), key=lambda item: item[0]):
                    if lora and "lora_" in name:  # the seed's adapter, not the reference
                        continue
                    with gather(param):
                        h.update(f"{name} {param.dtype}".encode())
                        h.update(param.detach().float().cpu().numpy().tobytes())
                self._gathered_hash = h.hexdigest()
            return self._gathered_hash

    return Llama3DPOTrainer


def pair_logps(model, dataset, collator, batch_size: int):
    """Per-pair summed log-probs (chosen, rejected) of `model` on TRL-tokenized `dataset`, formatting tokens out
    when `collator` adds `format_mask` and the model's forward is wrapped. Returns two float32 CPU tensors."""
    import torch
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    loader = DataLoader(dataset.select_columns(list(TOKEN_COLUMNS)), batch_size=batch_size, collate_fn=collator)
    chosen, rejected = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["input_ids"].masked_fill(batch.pop("completion_mask") == 0, -100)
            out = model(**batch, labels=labels, fused_lm_head=True, use_cache=False)
            c, r = out.log_probs.sum(dim=1).float().cpu().chunk(2)
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


# ---- the training process -----------------------------------------------------------------------------------


def trl_args(settings: dict, output_dir: str | Path, **overrides):
    """The frozen stage settings (DPOConfig fields plus `seed`) -> TRL's DPOConfig: the Llama 3 loss
    (sigmoid + `nll_weight` x NLL on chosen), stored reference log-probs, and CPU/GPU precision. `overrides` are
    TRL DPOConfig fields (tests and benchmarks use them)."""
    from trl import DPOConfig as TRLDPOConfig

    kwargs = dict(
        **common.trainer_args(settings, output_dir),
        beta=settings["beta"],
        loss_type=[settings.get("loss_type", "sigmoid"), "sft"],
        label_smoothing=settings.get("label_smoothing", 0.0),
        loss_weights=[1.0, settings["nll_weight"]],
        precompute_ref_log_probs=True,
        max_length=settings["max_length"],
        dataset_num_proc=None,
        disable_tqdm=False,
    )
    return TRLDPOConfig(**{**kwargs, **overrides})


load_policy = common.load_policy  # tests and benchmarks build the policy as the stage does


def train(settings: dict) -> dict:
    from posttrain.timing import Phases

    phases = Phases()
    distributed = common.setup(settings)  # before the trainer's config; the model loads after it
    out = Path(settings["output_dir"])
    trainer_dir = out / "trainer"
    # data, model, the trainer: with the reference log-probs, computed here (or read back from ref_logps/)
    with phases("load"):
        train_ds, eval_ds = build_datasets(settings["data"], settings["eval_fraction"])
        args = trl_args(settings, trainer_dir, **distributed)
        model, tokenizer, peft_config = load_policy(settings)
        trainer = _llama3_dpo_trainer_class()(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=peft_config,
            mask_format_tokens=settings["mask_format_tokens"],
            ref_store=Path(settings.get("ref_store") or out / "ref_logps"),
        )
    metrics: dict = {
        "train_rows": len(trainer.train_dataset),
        "eval_rows": len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0,
        "ref_logps": dict(trainer.ref_logps_source),
    }
    ref = trainer.train_dataset
    metrics["train_logp_accuracy_before"] = _accuracy(ref["ref_chosen_logps"], ref["ref_rejected_logps"])
    if trainer.eval_dataset is not None:
        # Before training the policy is the reference: DPO rewards are all 0, so only the loss (log 2 + the NLL
        # term) and how often the policy already prefers the chosen response say anything.
        ref = trainer.eval_dataset
        with phases("evaluate"):
            metrics["eval_before"] = {
                "loss": common.evaluate_before_training(trainer)["eval_loss"],
                "logp_accuracy": _accuracy(ref["ref_chosen_logps"], ref["ref_rejected_logps"]),
            }
    with phases("train"):
        metrics |= common.train_resuming(trainer, trainer_dir)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    metrics["loss_curve"] = [
        {
            "step": h["step"],
            "loss": h["loss"],
            "reward_accuracy": h.get("rewards/accuracies"),
            "reward_margin": h.get("rewards/margins"),
        }
        for h in logged
    ]
    if logged:  # TRL's implicit-reward metrics, averaged over the last logging window
        metrics["train_reward_accuracy"] = logged[-1].get("rewards/accuracies")
        metrics["train_reward_margin"] = logged[-1].get("rewards/margins")
    if trainer.eval_dataset is not None:
        with phases("evaluate"):
            after = trainer.evaluate()
            chosen, rejected = pair_logps(
                trainer.model, trainer.eval_dataset, trainer.data_collator, args.per_device_eval_batch_size
            )
        metrics["eval_after"] = {
            "loss": after["eval_loss"],
            "reward_accuracy": after["eval_rewards/accuracies"],
            "reward_margin": after["eval_rewards/margins"],
            "logp_accuracy": _accuracy(chosen.tolist(), rejected.tolist()),
        }

    with phases("save"):
        common.save_model(trainer, out / "model", tokenizer, merge_lora=peft_config is not None,
                          dtype=settings.get("dtype") or "auto")
    metrics["seconds"] = phases.seconds()
    if common.is_main():
        if not settings["keep_checkpoints"]:
            shutil.rmtree(trainer_dir, ignore_errors=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _accuracy(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs whose chosen response has the higher summed log-prob."""
    return sum(c > r for c, r in zip(chosen, rejected)) / max(len(chosen), 1)


def main(argv: list[str] | None = None) -> None:
    common.main(train, "posttrain.train.dpo", argv)


if __name__ == "__main__":
    main()
