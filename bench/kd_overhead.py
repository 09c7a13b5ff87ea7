"""What token-level distillation costs: bytes stored per generated token, and SFT step time with the KD loss
against TRL's own SFT loss on the same batches.

    python bench/kd_overhead.py RUN_DIR [--round 1] [--steps 8] [--weight 0.5]

RUN_DIR: a run whose generate stage kept the teacher's log-probs (`generate.teacher_logprobs`), e.g.
`posttrain experiment=distill_quickstart generate.teacher_logprobs=20 run_dir=RUN_DIR`. Storage: the Arrow buffers
of the generations' KD columns (completion_ids, topk_ids, topk_logprobs) over the generated tokens, and the whole
row against the row without them. Time: two trainers on the student the run's SFT stage started from, one TRL's
SFTTrainer (cross-entropy) and one with posttrain's KD loss, each given the same batches in turn, A and B
interleaved, forward + backward per batch (`training_step`); medians and spread over `--steps` batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def _column_bytes(table, names) -> int:
    return sum(table.column(n).nbytes for n in names)


def storage(generations: Path) -> dict:
    import datasets

    from data_gen.logprobs import KD_COLUMNS

    ds = datasets.load_from_disk(str(generations))
    table = ds.data.table
    tokens = sum(len(t) for t in ds["topk_ids"])
    kd = _column_bytes(table, KD_COLUMNS)
    rest = _column_bytes(table, [c for c in ds.column_names if c not in KD_COLUMNS])
    return {"rows": len(ds), "generated_tokens": tokens, "k": len(ds[0]["topk_ids"][0]),
            "kd_bytes_per_token": kd / tokens, "row_bytes_without_kd": rest / len(ds),
            "row_bytes_with_kd": (kd + rest) / len(ds)}


def step_times(sft_rows: Path, student: str, steps: int, weight: float, batch_size: int) -> dict:
    import torch
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.train import kd, sft

    work = Path(tempfile.mkdtemp(prefix="kd-bench-"))
    tok = load_tokenizer(student)
    ce_rows, _, held = sft.build_datasets([str(sft_rows)], 0.0)
    kd_rows, counts = kd.build_train([str(sft_rows)], held, tok, 256, work / "rows")

    def config(name, **extra):
        return SFTConfig(output_dir=str(work / name), per_device_train_batch_size=batch_size, max_length=256,
                         completion_only_loss=True, use_cpu=True, report_to=[], seed=0, dataset_num_proc=None,
                         disable_tqdm=True, **extra)

    plain = SFTTrainer(model=load_causal_lm(student), args=config("ce"), train_dataset=ce_rows, processing_class=tok)
    distil = kd.trainer_class()(
        model=load_causal_lm(student), args=config("kd", remove_unused_columns=False), train_dataset=kd_rows,
        processing_class=tok, data_collator=kd.Collator(DataCollatorForLanguageModeling(tok.pad_token_id)),
        kd_weight=weight, kd_temperature=1.0)
    def cycle(trainer):
        while True:
            yield from trainer.get_train_dataloader()

    batches = {name: cycle(t) for name, t in (("ce", plain), ("kd", distil))}
    for trainer in (plain, distil):
        trainer.current_gradient_accumulation_steps = 1  # what train() sets before its first step
    seconds: dict[str, list[float]] = {"ce": [], "kd": []}
    for step in range(steps + 1):  # the first batch of each warms up and is not counted
        for name, trainer in (("ce", plain), ("kd", distil)) if step % 2 == 0 else (("kd", distil), ("ce", plain)):
            inputs = next(batches[name])
            trainer.model.train()
            start = time.process_time()
            trainer.training_step(trainer.model, inputs)
            if step:
                seconds[name].append(time.process_time() - start)
            trainer.model.zero_grad(set_to_none=True)
    out = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for name, v in seconds.items()}
    out["kd_over_ce"] = out["kd"]["median_s"] / out["ce"]["median_s"]
    out["rows"] = counts
    out["torch_threads"] = torch.get_num_threads()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    manifest = json.loads((args.run_dir / "manifest.json").read_text())
    by_stage = {e["stage"]: e for e in manifest["stages"] if e["round"] == args.round}
    generations = args.run_dir / by_stage["generate"]["outputs"]["generations"]
    sft_rows = args.run_dir / by_stage["select"]["outputs"]["sft"]
    student = json.loads((args.run_dir / by_stage["sft"]["dir"] / "train_config.json").read_text())["model"]
    print(json.dumps({"storage": storage(generations)}, indent=2), flush=True)
    print(json.dumps({"step_seconds": step_times(sft_rows, student, args.steps, args.weight, args.batch_size)},
                     indent=2))


if __name__ == "__main__":
    main()
