"""Prefix-shared K-sampling vs plain `generate(num_return_sequences=K)` on the local `hf` backend.

    OMP_NUM_THREADS=1 python bench/prefix_sharing.py

Rejection sampling draws K answers per prompt (Llama 3: K = 10-30, prompts ~1000 tokens, answers ~300). Plain
`generate` encodes each prompt K times; `HFBackend(prefix_sharing=True)` prefills it once and copies its KV cache
to the K samples. Scaled down for a CPU: a random 4-layer Llama, ~400-token chat prompts, 32-token answers.
Both run in this process on the same model in float32, one warm-up each, best of 3. About 1.5 minutes on 2 cores.
The samples differ (the backend draws tokens by inverse transform sampling, `generate` by torch.multinomial).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from data_gen.backend import Sampling
from data_gen.hf_backend import HFBackend  # noqa: E402
from posttrain.tiny import build_tiny  # noqa: E402

KS = (4, 16)
N_PROMPTS = 3
NEW_TOKENS = 32
REPEATS = 3
TEXT = "Please write a short poem about the sea, the wind and the stars. "


def chat_prompts() -> list[list[dict]]:
    """Long prompts of slightly different lengths (so the batch is left-padded), made by repeating text."""
    return [
        [
            {"role": "system", "content": "You are a helpful assistant. Answer the question briefly and correctly."},
            {"role": "user", "content": TEXT * (12 + i) + f"Question {i}: which line is best?"},
        ]
        for i in range(N_PROMPTS)
    ]


def best_time(backend: HFBackend, prompts, k: int, sampling: Sampling) -> tuple[float, float, int, list]:
    """(best wall time and best CPU time of REPEATS calls, answer tokens of a call, the answers).

    CPU time is there because this is often a shared machine: with one torch thread it is close to the wall time
    the call would take alone, while the wall time also counts the time other processes held the cores."""
    walls, cpus, out = [], [], None
    for _ in range(REPEATS):
        wall, cpu = time.perf_counter(), time.process_time()
        out = backend.generate(prompts, n=k, sampling=sampling)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus), sum(s["completion_tokens"] for samples in out for s in samples), out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny(
            Path(tmp) / "model", layers=4, hidden=256, heads=4, kv_heads=2, intermediate=688,
            max_position_embeddings=2048,
        )
        prompts = chat_prompts()
        ours = HFBackend(str(model), batch_size=N_PROMPTS, device="cpu", dtype="float32")
        plain = HFBackend(str(model), batch_size=N_PROMPTS, device="cpu", prefix_sharing=False, dtype="float32")
        # Warm-up: one small call per backend (first-call allocations), which also gives the prompt lengths.
        warm = Sampling(max_new_tokens=NEW_TOKENS)
        lengths = [samples[0]["prompt_tokens"] for samples in ours.generate(prompts, n=KS[0], sampling=warm)]
        plain.generate(prompts, n=KS[0], sampling=warm)
        print(f"model: random Llama, 4 layers, hidden 256; torch threads {torch.get_num_threads()}, "
              f"{os.cpu_count()} CPUs")
        print(f"{N_PROMPTS} prompts of {min(lengths)}-{max(lengths)} tokens, {NEW_TOKENS} new tokens, "
              f"temperature 1.0, answer tokens/s, best of {REPEATS} after a warm-up\n")
        print(f"{'K':>3} | {'tokens/s ours':>13} | {'tokens/s baseline':>17} | {'ratio':>5} | "
              f"ratio by CPU time")
        print("----+---------------+-------------------+-------+------------------")
        for k in KS:
            sampling = Sampling(temperature=1.0, max_new_tokens=NEW_TOKENS, seed=0)
            wall_ours, cpu_ours, n_ours, _ = best_time(ours, prompts, k, sampling)
            wall_plain, cpu_plain, n_plain, _ = best_time(plain, prompts, k, sampling)
            rate_ours, rate_plain = n_ours / wall_ours, n_plain / wall_plain
            cpu_ratio = (n_ours / cpu_ours) / (n_plain / cpu_plain)
            print(f"{k:>3} | {rate_ours:>13.1f} | {rate_plain:>17.1f} | {rate_ours / rate_plain:>5.2f} | "
                  f"{cpu_ratio:>17.2f}")


if __name__ == "__main__":
    main()
