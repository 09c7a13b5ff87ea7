"""The GPU benchmark (`bench/gpu.sh`): what posttrain's training and sampling paths deliver on one GPU, against
plain TRL on the same model and data.

    bash bench/gpu.sh                      # a 1B-class Llama (Llama 3.2 1B's shape), bf16, seq 2048, one GPU
    bash bench/gpu.sh --size tiny --steps 3 --seq 256   # the same code on a CPU: a check, not a figure

Three parts, each variant in a fresh process (memory peaks are per process), A and B run in turn:
1. SFT: tokens/s and MFU of posttrain's SFT set-up (posttrain.train.common: precision, activation
   checkpointing, the stage's TrainingArguments) against a plain TRL SFTTrainer script with bf16 and gradient
   checkpointing, on the same random-init model and packed-length rows of `--seq` tokens. MFU counts
   6 x parameters + 12 x layers x hidden x seq FLOPs per trained token (forward and backward; activation
   recomputation not counted) over the GPU's dense bf16 peak (`--peak-tflops`; H100/H200 SXM: 989).
2. DPO: peak GPU memory (torch.cuda.max_memory_allocated) and median step time of posttrain's DPO (reference
   log-probs computed in one pass before training, no resident reference model) against TRL's DPOTrainer with
   its resident reference model; setup time (the reference pass included) in wall seconds.
3. Sampling: the hf backend's useful tokens/s at K = 16 (each prompt prefilled once, finished samples dropped).
The model is random: its answers are noise, and only the speed and memory mean anything.
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

SIZES = {  # name: LlamaConfig fields
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
PARTS = ("sft_posttrain", "sft_trl", "dpo_trl_resident_ref", "dpo_posttrain_stored_ref", "sample_hf_k16")


def build(folder: Path, size: str, seq: int) -> None:
    """A random-init Llama of `size` with posttrain's tiny tokenizer (its ids fit any vocabulary) as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    config = LlamaConfig(**SIZES[size], max_position_embeddings=max(seq * 2, 4096), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _peak_mb() -> float:
    import torch

    if _gpu():
        return torch.cuda.max_memory_allocated() / 2**20
    return float("nan")  # CPU: no allocator peak; see bench/dpo_memory.py for RSS


class _Steps:
    """A TrainerCallback recording the wall time at the end of every optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Steps(TrainerCallback):
            def __init__(self):
                self.ends: list[float] = []

            def on_step_end(self, *a, **k):
                if _gpu():
                    import torch

                    torch.cuda.synchronize()
                self.ends.append(time.perf_counter())

        return Steps()


def sft(variant: str, work: Path, opts) -> dict:
    import datasets
    import torch
    from trl import SFTConfig, SFTTrainer

    from posttrain.config import SFTConfig as StageConfig
    from posttrain.models import load_causal_lm, load_tokenizer
    from posttrain.train import common

    model_dir = str(work / "model")
    g = torch.Generator().manual_seed(0)
    vocab = min(SIZES[opts.size]["vocab_size"], 512)
    rows = [{"input_ids": torch.randint(0, vocab, (opts.seq,), generator=g).tolist()} for _ in range(64)]
    data = datasets.Dataset.from_list(rows)
    out = work / variant
    extra = dict(max_steps=opts.steps + 2, save_strategy="no", logging_steps=1000, disable_tqdm=True,
                 report_to=[], max_length=opts.seq, dataset_num_proc=None)
    if variant == "sft_posttrain":  # the stage's own arguments (posttrain/train/sft.py)
        from dataclasses import asdict

        settings = {**asdict(StageConfig(batch_size=opts.batch_size, lr_scheduler="constant")), "seed": 0,
                    "dtype": "bfloat16" if _gpu() else "float32", "model": model_dir}
        base = common.trainer_args(settings, out)
        base.update({k: v for k, v in extra.items() if k not in ("max_length", "dataset_num_proc")})
        args = SFTConfig(**base, max_length=opts.seq, dataset_num_proc=None)
        model, tok, _ = common.load_policy(settings)
    else:  # what a TRL user writes
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=opts.batch_size, learning_rate=1e-5,
                         bf16=_gpu(), gradient_checkpointing=_gpu(), use_cpu=not _gpu(), **extra)
        model = load_causal_lm(model_dir, dtype=torch.float32)
        tok = load_tokenizer(model_dir)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
    steps = _Steps()
    trainer.add_callback(steps)
    torch.cuda.reset_peak_memory_stats() if _gpu() else None
    trainer.train()
    seconds = statistics.median(b - a for a, b in zip(steps.ends[1:], steps.ends[2:]))  # after 2 warm-up steps
    tokens_per_s = opts.batch_size * opts.seq / seconds
    n = sum(p.numel() for p in model.parameters())
    cfg = SIZES[opts.size]
    flops_per_token = 6 * n + 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * opts.seq
    return {"variant": variant, "step_s": seconds, "tokens_per_s": tokens_per_s, "params_b": n / 1e9,
            "mfu": tokens_per_s * flops_per_token / (opts.peak_tflops * 1e12), "peak_mb": _peak_mb(),
            "precision": "bf16" if args.bf16 else "fp32", "checkpointing": bool(args.gradient_checkpointing)}


def dpo(variant: str, work: Path, opts) -> dict:
    import dataclasses

    import datasets
    import torch
    from trl import DPOTrainer

    from posttrain.train.dpo import DPOConfig, Llama3DPOTrainer, build_datasets, load_policy, trl_args

    words = "the model answers the question with care and explains each step of the reasoning".split()
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Question {i}: " + " ".join(words)}],
             "chosen": " ".join(words[(i + j) % len(words)] for j in range(opts.seq // 4)),
             "rejected": " ".join(words[(2 * i + j) % len(words)] for j in range(opts.seq // 4)) + "!",
             "chosen_score": 1.0, "rejected_score": 0.0, "margin": 1.0} for i in range(32)]
    datasets.Dataset.from_list(rows).save_to_disk(str(work / f"pairs_{variant}"))
    settings = {**dataclasses.asdict(DPOConfig(batch_size=max(1, opts.batch_size // 2), max_length=opts.seq,
                                               lr_scheduler="constant")),
                "seed": 0, "dtype": "bfloat16" if _gpu() else "float32", "model": str(work / "model")}
    train_ds, _ = build_datasets([str(work / f"pairs_{variant}")], 0.0)
    stored = variant == "dpo_posttrain_stored_ref"
    args = trl_args(settings, work / variant, precompute_ref_log_probs=stored, max_steps=opts.steps + 2,
                    save_strategy="no", logging_steps=1000, disable_tqdm=True, report_to=[])
    torch.cuda.reset_peak_memory_stats() if _gpu() else None
    start = time.perf_counter()
    model, tok, _ = load_policy(settings)
    common = dict(model=model, args=args, train_dataset=train_ds, processing_class=tok)
    trainer = (Llama3DPOTrainer(**common, mask_format_tokens=True, ref_store=work / "ref_logps") if stored
               else DPOTrainer(**common))
    setup_s = time.perf_counter() - start
    steps = _Steps()
    trainer.add_callback(steps)
    trainer.train()
    return {"variant": variant, "setup_s": setup_s, "peak_mb": _peak_mb(),
            "step_s": statistics.median(b - a for a, b in zip(steps.ends[1:], steps.ends[2:])),
            "resident_ref": trainer.ref_model is not None}


def sample(variant: str, work: Path, opts) -> dict:
    from data_gen.backend import Sampling
    from data_gen.hf_backend import HFBackend

    backend = HFBackend(str(work / "model"), batch_size=8, dtype="bfloat16" if _gpu() else "float32")
    prompts = [[{"role": "user", "content": f"Question {i}: write a long answer."}] for i in range(8)]
    backend.generate(prompts[:1], 2, Sampling(max_new_tokens=8, seed=1))  # warm-up
    if _gpu():
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    out = backend.generate(prompts, 16, Sampling(temperature=1.0, max_new_tokens=opts.new_tokens, seed=0))
    seconds = time.perf_counter() - start
    tokens = sum(s["completion_tokens"] for p in out for s in p)
    return {"variant": variant, "prompts": len(prompts), "k": 16, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "peak_mb": _peak_mb()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after 2 warm-up steps)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--work", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.variant:
        fn = {"sft": sft, "dpo": dpo, "sample": sample}[opts.variant.split("_")[0]]
        print("RESULT " + json.dumps(fn(opts.variant, Path(opts.work), opts)), flush=True)
        return

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; model: {opts.size}, seq {opts.seq}, batch {opts.batch_size}, {opts.steps} timed steps",
          flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        build(work / "model", opts.size, opts.seq)
        print(f"built the random model in {time.perf_counter() - start:.0f} s", flush=True)
        passthrough = ["--size", opts.size, "--seq", str(opts.seq), "--batch-size", str(opts.batch_size),
                       "--steps", str(opts.steps), "--new-tokens", str(opts.new_tokens),
                       "--peak-tflops", str(opts.peak_tflops)]
        for variant in opts.parts:
            proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--work", str(work), *passthrough],
                                  capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{variant} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            results.append(json.loads(lines[-1][len("RESULT "):]))
            print(json.dumps(results[-1]), flush=True)
    by = {r["variant"]: r for r in results}
    if {"sft_posttrain", "sft_trl"} <= set(by):
        ours, trl = by["sft_posttrain"], by["sft_trl"]
        print(f"SFT: posttrain {ours['tokens_per_s']:.0f} tokens/s (MFU {ours['mfu']:.1%}) vs TRL "
              f"{trl['tokens_per_s']:.0f} tokens/s (MFU {trl['mfu']:.1%}): "
              f"{ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x")
    if {"dpo_posttrain_stored_ref", "dpo_trl_resident_ref"} <= set(by):
        ours, trl = by["dpo_posttrain_stored_ref"], by["dpo_trl_resident_ref"]
        print(f"DPO: peak {ours['peak_mb']:.0f} MB vs TRL's resident reference {trl['peak_mb']:.0f} MB "
              f"({ours['peak_mb'] / trl['peak_mb']:.2f}x); step {ours['step_s'] * 1000:.0f} ms vs "
              f"{trl['step_s'] * 1000:.0f} ms ({ours['step_s'] / trl['step_s']:.2f}x); setup {ours['setup_s']:.0f} s "
              f"vs {trl['setup_s']:.0f} s")
    if "sample_hf_k16" in by:
        print(f"sampling: hf backend, K=16: {by['sample_hf_k16']['tokens_per_s']:.0f} tokens/s")


if __name__ == "__main__":
    main()
