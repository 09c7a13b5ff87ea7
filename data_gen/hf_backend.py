"""The local `hf` generation backend: transformers `generate` on small models (CPU tests, quick recipes).

Large teachers belong on vLLM or an OpenAI-compatible server; this backend keeps the same interface:
`generate(prompts, n, sampling) -> n completions per prompt`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from data_gen.backend import Sampling
from data_gen.logprobs import sample_fields
from posttrain.chat import end_of_turn_ids
from posttrain.models import inference_dtype, inference_model, load_tokenizer

__all__ = ["HFBackend", "Sampling"]


class HFBackend:
    """Batched sampling with transformers. `model` is any spec `posttrain.models` resolves.

    With `prefix_sharing` (the default) each prompt is prefilled once and its KV cache serves all `n` of its
    samples, the compute half of the paper's PagedAttention trick (Llama 3 paper, "Rejection sampling"); then the
    samples are decoded one token a step by the model's forward, with transformers' own temperature and top-p
    warpers, and a sequence that has ended leaves the batch and its cache (`DynamicCache.batch_select_indices`):
    a step costs the rows still writing, not the longest answer's. It samples with the recipe's temperature and
    top_p only: sampling defaults in a model's generation_config.json (top_k, repetition_penalty) are not applied,
    as vLLM and the endpoints get only the recipe's settings too. `prefix_sharing=False` keeps plain
    `generate(num_return_sequences=n)`, which encodes each prompt `n` times and decodes every row to the end.
    With `Sampling.top_logprobs` = k, each step also keeps the k most likely next tokens of the raw
    log-softmax (data_gen/logprobs.py); texts are the same as without (the same random draws).
    """

    def __init__(
        self,
        model: str,
        batch_size: int = 8,
        dtype: str = "auto",
        device: str = "auto",
        prefix_sharing: bool = True,
    ):
        self.model_spec = model
        self.batch_size = batch_size
        self.prefix_sharing = prefix_sharing
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = load_tokenizer(model)
        # Decoder-only models continue from the last position: pad on the left so it is the prompt's end.
        self.tokenizer.padding_side = "left"
        chosen, why = inference_dtype(dtype, self.device)
        self.model, self.kept = inference_model(model, chosen, self.device)  # the previous stage's, if the same
        self.dtype = str(chosen).removeprefix("torch.")
        kept = ", kept from the previous stage" if self.kept else ""
        print(f"posttrain: {self.model_spec} runs in {self.dtype} on {self.device} ({why}){kept}", flush=True)
        self.stop_ids = end_of_turn_ids(self.tokenizer)

    def stats(self) -> dict:
        """What the generate stage's manifest entry records of this backend: the precision it chose, and whether its
        model was kept from the previous stage rather than loaded (posttrain.models.keeping_models)."""
        return {"engine": "hf", "dtype": self.dtype, "device": self.device, "kept": self.kept}

    @torch.inference_mode()
    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[dict]]:
        """Sample `n` completions for each chat prompt (a list of messages). Returns, per prompt, `n` dicts with
        text, prompt_tokens, completion_tokens and finish_reason ("stop" at an end-of-turn token, else
        "length"). Seeded by `sampling.seed`: the same call gives the same texts."""
        torch.manual_seed(sampling.seed)
        greedy = sampling.temperature == 0
        if sampling.top_logprobs and not self.prefix_sharing:
            raise ValueError("HFBackend: top_logprobs needs the decoding loop (prefix_sharing=True)")
        out: list[list[dict]] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            enc = self.tokenizer.apply_chat_template(
                batch, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
            ).to(self.device)
            # Greedy decoding gives one answer per prompt; it is repeated below rather than recomputed.
            gen, tops = self._sample(enc["input_ids"], enc["attention_mask"], 1 if greedy else n, sampling)
            prompt_len = enc["input_ids"].shape[1]
            prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
            for i in range(len(batch)):
                samples = []
                for j in range(n):
                    ids = gen[i if greedy else i * n + j, prompt_len:].tolist()
                    stop_at = next((t for t, tok in enumerate(ids) if tok in self.stop_ids), None)
                    body = ids if stop_at is None else ids[:stop_at]
                    samples.append(
                        {
                            "text": self.tokenizer.decode(body, skip_special_tokens=True),
                            "prompt_tokens": int(prompt_tokens[i]),
                            "completion_tokens": len(body),
                            "finish_reason": "length" if stop_at is None else "stop",
                        }
                    )
                    if tops is not None:
                        row = i if greedy else i * n + j
                        samples[-1] |= sample_fields(body, tops[0][row].tolist(), tops[1][row].tolist(),
                                                     stopped=None if stop_at is None else ids[stop_at],
                                                     chosen=tops[2][row].tolist())
                out.append(samples)
        return out

    def _sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, sampling: Sampling):
        """(`k` sequences per row of the left-padded batch, row i's at i*k ... i*k+k-1, prompt included; with
        `sampling.top_logprobs`, the decoding loop's top-k arrays (`_decode`), else None)."""
        greedy = sampling.temperature == 0
        options = dict(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=0,  # off, as in the decoding loop (None would let generate apply its default of 50)
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if not self.prefix_sharing:
            return self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=k, **options
            ), None
        # Prefill each prompt once; the logits at its last token give the first answer token of all k samples.
        cache = DynamicCache(config=self.model.config)
        first = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            # What `generate` would use: left padding does not shift the real tokens' positions.
            position_ids=(attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1, :].float()
        if k > 1:
            # Honest limit: the prefill compute is shared, but the cache is then copied k times, one per sample;
            # memory is not shared copy-on-write pages as in vLLM's PagedAttention.
            cache.batch_repeat_interleave(k)
            first = first.repeat_interleave(k, dim=0)
            input_ids = input_ids.repeat_interleave(k, dim=0)
            attention_mask = attention_mask.repeat_interleave(k, dim=0)
        return self._decode(input_ids, attention_mask, cache, first, sampling)

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, first: torch.Tensor,
                sampling: Sampling):
        """Decode from `cache` (the prompts prefilled) and `first`, the float logits at each row's last prompt
        token, until each row writes an end-of-turn token or `max_new_tokens`; a finished row is dropped from the
        batch. Returns the rows as `generate` does: prompt + answer, right-padded with the pad token after an
        answer's end; and, with `sampling.top_logprobs` = k, the k most likely next tokens of every row's steps
        ([rows, steps, k] ids and log-probs, and the log-prob of each token taken [rows, steps]), else None."""
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        greedy = sampling.temperature == 0
        warpers = LogitsProcessorList([] if greedy else [TemperatureLogitsWarper(sampling.temperature)] + (
            [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []))
        stop = torch.tensor(sorted(self.stop_ids), device=input_ids.device)
        rows = input_ids.shape[0]
        answers = torch.full((rows, sampling.max_new_tokens), self.tokenizer.pad_token_id, dtype=torch.long,
                             device=input_ids.device)
        active = torch.arange(rows, device=input_ids.device)  # the batch's rows, by their index in `answers`
        mask = attention_mask
        step_ids = None
        positions = mask.long().sum(-1, keepdim=True) - 1  # left padding does not shift the real tokens
        k = sampling.top_logprobs
        if k:
            top_ids = torch.zeros((rows, sampling.max_new_tokens, k), dtype=torch.int32, device=input_ids.device)
            top_lps = torch.zeros((rows, sampling.max_new_tokens, k), dtype=torch.float32, device=input_ids.device)
            chosen_lps = torch.zeros((rows, sampling.max_new_tokens), dtype=torch.float32, device=input_ids.device)
        logits = first
        for step in range(sampling.max_new_tokens):
            if step:  # the prefill gave step 0's logits; then each step feeds the token drawn before it
                logits = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=True).logits[:, -1, :].float()
            if k:
                logprobs = torch.log_softmax(logits, dim=-1)
                top_lps[active, step], ids = logprobs.topk(k, dim=-1)
                top_ids[active, step] = ids.to(torch.int32)
            if greedy:
                tokens = logits.argmax(-1)
            else:
                scores = warpers(answers[active, :step], logits)
                tokens = draw(torch.softmax(scores, dim=-1))
            answers[active, step] = tokens
            if k:
                chosen_lps[active, step] = logprobs.gather(1, tokens[:, None]).squeeze(1)
            going = ~torch.isin(tokens, stop)
            if not going.all():
                if not going.any():
                    break
                keep = going.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                active, mask, positions, tokens = active[keep], mask[keep], positions[keep], tokens[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            positions = positions + 1
            step_ids = tokens[:, None]
        sequences = torch.cat([input_ids, answers], dim=1)
        return sequences, ((top_ids, top_lps, chosen_lps) if k else None)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token id per row of `probs`, drawn from it by inverse transform sampling: one uniform number a row,
    found in the row's cumulative sums (float64). The distribution of `torch.multinomial(probs, 1)`, which on a
    CPU costs ~1.5 ms a row over a 49k vocabulary (40% of a sampling step of SmolLM2-135M) against ~0.03 ms here;
    the draws are not multinomial's, so a seed gives other samples than before, as repeatably. A token of zero
    probability is never drawn (the first cumulative sum above the draw belongs to a token that adds mass)."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    if not (torch.isfinite(total) & (total > 0)).all():  # as torch.multinomial refuses such rows
        raise ValueError("draw: a row of probabilities is NaN, infinite or all zero (logits overflowed?)")
    u = torch.rand(total.shape, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # strictly below the total
    return torch.searchsorted(cdf, u, right=True).squeeze(1)
