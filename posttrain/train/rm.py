"""Reward-model stage: a thin wrapper on TRL's RewardTrainer, run as its own process (Llama 3 section 4.1.2).

`python -m posttrain.train.rm train_config.json` trains a sequence-classification head (num_labels=1) on a
backbone with the Bradley-Terry loss without margin, -log sigmoid(r(x, y_chosen) - r(x, y_rejected)).

Preference data: one or more `datasets` folders. A folder's rows are either
- pairs: `messages` (prompt turns), `chosen` (str), `rejected` (str); or
- ranked rows: `messages`, `responses` (list of str, best first: edited > chosen > rejected in Llama 3), expanded
  into every ordered pair, so 3 responses give 3 pairs. (Llama 3 packs all of a prompt's responses into one row
  for speed; TRL's trainer takes pairs, so we expand, which trains on the same comparisons.)
An optional `prompt_id` column keys the held-out split (by prompt, so no prompt is on both sides); without it
the prompt turns are. Pairs whose responses are near-identical are dropped and counted (`near_identical`).

Inputs are tokenized here with `posttrain.rm_format.rm_inputs`, the function `RewardModelScorer` uses, and handed
to RewardTrainer pre-tokenized (`chosen_ids` / `rejected_ids`): TRL's own preprocessing knows no BERT-style text
pairs, and this way training and scoring cannot drift apart. There is no `margin` column, so TRL's loss is the
plain Bradley-Terry one. The process resumes from its last Trainer checkpoint, measures held-out pairwise
accuracy before and after training, and leaves `model/` (a plain HF folder that `RewardModelScorer` loads) with
`posttrain_reward.json` (mean and std of its scores on training responses, for `normalize=True`).

The driver side, `rm_stage`, builds the frozen settings and launches this module (one process, or one per
rank under torchrun / accelerate launch with DeepSpeed ZeRO-3: see posttrain/train/common.py).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
import shutil
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from posttrain.config import RMConfig, TrainJob  # noqa: F401 - RMConfig: the stage's settings, for callers
from posttrain.rundir import Inputs, StageResult
from posttrain.train import common
from posttrain.train.launch import launch_stage

NORM_SAMPLE = 4096  # training responses scored for the normalisation statistics


def rm_stage(job: TrainJob, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `job.train`: the recipe's `rm` section (RMConfig); `inputs`: `model` (backbone spec: a
    causal LM or an encoder, gets a fresh 1-output head), `data` (every earlier round's pairs folders) and
    `user_data` (the local paths of `rm.data`'s sources, read from `job.train.data`: pairs or ranked rows).
    Output: `model/` (HF sequence-classification folder). Rows: training pairs."""
    from posttrain.errors import PosttrainError
    from posttrain.models import resolve_model

    data, user_data = common.with_user_data(job, "rm", "ranked", inputs.get("data", []), out)
    if not data:
        raise PosttrainError("rm stage: no preference data (no earlier round's pairs and no rm.data)")
    settings = {
        **{k: v for k, v in asdict(job.train).items() if k not in ("enabled", "model", "data", "seeds")},
        "model": resolve_model(inputs["model"]),
        "data": data,
    }
    first, metrics = launch_stage("posttrain.train.rm", job, settings, out)
    if user_data:
        metrics["user_data"] = user_data
    return StageResult(outputs={"model": "model"}, rows=first["train_pairs"], metrics=metrics)


# ---- preference pairs -----------------------------------------------------------------------------------------


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def near_identical(a: str, b: str, min_difference: float) -> bool:
    """True when the two responses' similarity ratio (difflib, characters of the normalised texts) exceeds
    1 - min_difference. The cheap upper bounds are tried first; most pairs stop there."""
    limit = 1.0 - min_difference
    m = difflib.SequenceMatcher(None, _normalise(a), _normalise(b), autojunk=False)
    return m.real_quick_ratio() > limit and m.quick_ratio() > limit and m.ratio() > limit


def _prompt_key(row: dict) -> str:
    if row.get("prompt_id") is not None:
        return str(row["prompt_id"])
    return hashlib.sha256(json.dumps(row["messages"], sort_keys=True).encode()).hexdigest()[:16]


def preference_pairs(paths: list[str], min_difference: float) -> tuple[list[dict], dict]:
    """Preference folders -> pairs `{prompt_key, messages, chosen, rejected}` and counts
    `{"rows", "pairs_before_filter", "near_identical"}`. Ranked rows expand into all ordered pairs."""
    import datasets

    pairs: list[dict] = []
    counts = {"rows": 0, "pairs_before_filter": 0, "near_identical": 0}
    for path in paths:
        ds = datasets.load_from_disk(path)
        cols = set(ds.column_names)
        ranked = "responses" in cols
        is_pairs = {"chosen", "rejected"} <= cols
        if "messages" not in cols or ranked == is_pairs:
            raise ValueError(
                f"preference data {path} has columns {sorted(cols)}; expected `messages` with either `chosen` and "
                "`rejected` (pairs) or `responses` (ranked, best first)"
            )
        for row in ds:
            counts["rows"] += 1
            responses = row["responses"] if ranked else [row["chosen"], row["rejected"]]
            if len(responses) < 2 or not all(isinstance(r, str) for r in responses):
                raise ValueError(f"preference data {path}: row {counts['rows'] - 1} needs >= 2 text responses")
            key = _prompt_key(row)
            for i in range(len(responses)):
                for j in range(i + 1, len(responses)):
                    counts["pairs_before_filter"] += 1
                    if near_identical(responses[i], responses[j], min_difference):
                        counts["near_identical"] += 1
                        continue
                    pairs.append(
                        {"prompt_key": key, "messages": row["messages"], "chosen": responses[i],
                         "rejected": responses[j]}
                    )
    return pairs, counts


def split_pairs(pairs: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Held out by prompt (the SFT and DPO stages' rule), at least one prompt when eval_fraction > 0 and there are
    two."""
    held = common.held_out([p["prompt_key"] for p in pairs], eval_fraction)
    return [p for p, h in zip(pairs, held) if not h], [p for p, h in zip(pairs, held) if h]


def encode_pairs(pairs: list[dict], tokenizer, max_length: int):
    """Pairs -> a pre-tokenized RewardTrainer dataset: `chosen_ids`, `rejected_ids` (+ `*_token_type_ids` for text
    pairs), built by `rm_inputs`. No `margin` column: TRL would subtract it inside the sigmoid."""
    import datasets

    from posttrain.rm_format import rm_inputs

    def encode(row):
        c = rm_inputs(tokenizer, row["messages"], row["chosen"], max_length)
        r = rm_inputs(tokenizer, row["messages"], row["rejected"], max_length)
        out = {"chosen_ids": c["input_ids"], "rejected_ids": r["input_ids"]}
        if "token_type_ids" in c:
            out.update(chosen_token_type_ids=c["token_type_ids"], rejected_token_type_ids=r["token_type_ids"])
        return out

    ds = datasets.Dataset.from_list(pairs)
    return ds.map(encode, remove_columns=ds.column_names, desc="RM pairs", load_from_cache_file=False)


@dataclass
class PairCollator:
    """TRL's preference collator (chosen half, then rejected half, right-padded), plus BERT's segment ids,
    which TRL's collator does not carry."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch
        from trl.trainer.reward_trainer import DataCollatorForPreference
        from trl.trainer.utils import pad

        batch = DataCollatorForPreference(pad_token_id=self.pad_token_id)(
            [{"chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"]} for e in examples]
        )
        if "chosen_token_type_ids" in examples[0]:
            types = [torch.tensor(e["chosen_token_type_ids"]) for e in examples]
            types += [torch.tensor(e["rejected_token_type_ids"]) for e in examples]
            batch["token_type_ids"] = pad(types, padding_value=0, padding_side="right")
        return batch


# ---- the training process -------------------------------------------------------------------------------------


def _inputs(ds, side: str) -> list[dict]:
    types = f"{side}_token_type_ids"
    return [
        {"input_ids": row[f"{side}_ids"], **({"token_type_ids": row[types]} if types in row else {})} for row in ds
    ]


def pairwise_accuracy(model, ds, pad_token_id: int, batch_size: int) -> float:
    """Share of pairs whose chosen response scores strictly above the rejected one."""
    from posttrain.rm_format import score_inputs

    chosen = score_inputs(model, _inputs(ds, "chosen"), pad_token_id, batch_size, "RM eval chosen")
    rejected = score_inputs(model, _inputs(ds, "rejected"), pad_token_id, batch_size, "RM eval rejected")
    return sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)


def build_trainer(settings: dict, train_ds, tokenizer, distributed: dict | None = None):
    """RewardTrainer on the backbone in settings["model"] with a fresh one-output head; `distributed`: the extra
    TrainingArguments fields from `common.setup`."""
    from trl import RewardConfig, RewardTrainer

    weights, _ = common.precision_of(settings)
    args = RewardConfig(
        **common.trainer_args(settings, Path(settings["output_dir"]) / "trainer"),
        max_length=None,  # rm_inputs already cut every input to max_length
        center_rewards_coefficient=None,
        remove_unused_columns=False,  # keep the segment-id columns for PairCollator
        model_init_kwargs={"dtype": weights, **common.attention(settings)},
        disable_tqdm=False,
        **(distributed or {}),
    )
    return RewardTrainer(
        model=settings["model"],
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        data_collator=PairCollator(tokenizer.pad_token_id),
    )


def train(settings: dict) -> dict:
    from posttrain.models import load_tokenizer
    from posttrain.rm_format import NORM_FILE, length_limit, score_inputs
    from posttrain.timing import Phases

    phases = Phases()
    distributed = common.setup(settings)  # before the trainer's config; the trainer loads the model after it
    out = Path(settings["output_dir"])
    trainer_dir = out / "trainer"
    with phases("load"):  # pairs, tokenizer, encoding (the model loads with the trainer, below)
        tokenizer = load_tokenizer(settings["model"])
        pairs, counts = preference_pairs(settings["data"], settings["min_difference"])
        train_pairs, eval_pairs = split_pairs(pairs, settings["eval_fraction"])
        if not train_pairs:
            raise ValueError(f"no training pairs left in {settings['data']} ({counts})")
        train_ds = encode_pairs(train_pairs, tokenizer, settings["max_length"])
        eval_ds = encode_pairs(eval_pairs, tokenizer, settings["max_length"]) if eval_pairs else None
    limit = length_limit(tokenizer, settings["max_length"])
    metrics: dict = {
        "pairs": len(pairs),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "dropped_near_identical": counts["near_identical"],
        "preference_rows": counts["rows"],
        "input_format": "chat_template" if getattr(tokenizer, "chat_template", None) else "text_pair",
        "truncated_pairs": sum(
            max(len(r["chosen_ids"]), len(r["rejected_ids"])) >= limit for r in train_ds
        ) if limit else 0,
    }

    with phases("load"):
        trainer = build_trainer(settings, train_ds, tokenizer, distributed)
    bs = settings["batch_size"] * 2
    if eval_ds is not None:
        with phases("evaluate"):
            metrics["eval_accuracy_before"] = pairwise_accuracy(
                _untrained_scorer(trainer), eval_ds, tokenizer.pad_token_id, bs
            )
    with phases("train"):
        metrics |= common.train_resuming(trainer, trainer_dir)
    metrics["loss_curve"] = [
        {"step": h["step"], "loss": h["loss"], "accuracy": h.get("accuracy")}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    if eval_ds is not None:
        with phases("evaluate"):
            metrics["eval_accuracy_after"] = pairwise_accuracy(trainer.model, eval_ds, tokenizer.pad_token_id, bs)

    # Normalisation statistics over distinct training responses (a seeded sample of at most NORM_SAMPLE).
    responses = {json.dumps(x): x for side in ("chosen", "rejected") for x in _inputs(train_ds, side)}
    sample = sorted(responses)
    random.Random(settings["seed"]).shuffle(sample)
    with phases("evaluate"):
        scores = score_inputs(
            trainer.model, [responses[k] for k in sample[:NORM_SAMPLE]], tokenizer.pad_token_id, bs, "RM score stats"
        )
    stats = {
        "score_mean": statistics.fmean(scores),
        "score_std": statistics.pstdev(scores),
        "responses_scored": len(scores),
        "input_format": metrics["input_format"],
        "max_length": settings["max_length"],
    }
    metrics.update(score_mean=stats["score_mean"], score_std=stats["score_std"])

    model_dir = out / "model"
    with phases("save"):
        common.save_model(trainer, model_dir, tokenizer, merge_lora=False)
    metrics["seconds"] = phases.seconds()
    if common.is_main():
        (model_dir / NORM_FILE).write_text(json.dumps(stats, indent=2))
        if not settings["keep_checkpoints"]:
            shutil.rmtree(trainer_dir, ignore_errors=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _untrained_scorer(trainer):
    """The model to score with before training. Under ZeRO-3 its weights are still shards until train() wraps it
    in the engine that gathers them for each forward, so it goes into an inference engine first (as TRL does for
    DPO's reference log-probs); every rank scores the same inputs."""
    plugin = trainer.accelerator.state.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return trainer.model
    from trl.models import prepare_deepspeed

    return prepare_deepspeed(trainer.model, trainer.accelerator)


def main(argv: list[str] | None = None) -> None:
    common.main(train, "posttrain.train.rm", argv)


if __name__ == "__main__":
    main()
