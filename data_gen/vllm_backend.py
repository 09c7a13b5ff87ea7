"""The `vllm` generation backend: rejection sampling at scale on CUDA GPUs, same interface as the `hf` backend.

vLLM's scheduler gives what the Llama 3 paper credits for a >2x throughput in rejection sampling
(llama3-recipe.md, "Rejection sampling"): PagedAttention, so the K samples of a prompt share its KV-cache pages
(prefix caching), and requests admitted only when memory for their output is free. Select it in a recipe::

    generate:
      backend: {_target_: data_gen.vllm_backend.VLLMBackend, tensor_parallel_size: 8}

Prompts are rendered by the model's own chat template (tokenizer.apply_chat_template, add_generation_prompt=True)
and sent as token ids, so the model sees exactly what the `hf` backend feeds it; completions stop at the template's
end-of-turn tokens (posttrain.chat.end_of_turn_ids) and are decoded by the same tokenizer.

A 405B teacher: either run it here with `tensor_parallel_size` equal to the GPUs of one node (8 x 80 GB holds it
in FP8, e.g. an FP8 checkpoint or `quantization: fp8`, passed through to vllm.LLM), or start
`vllm serve <model> --tensor-parallel-size 8 [--pipeline-parallel-size N]` on the teacher's nodes and point
`data_gen.openai_backend.OpenAIBackend` at it, which keeps the trainer's GPUs free and survives driver restarts.
"""

from __future__ import annotations

from data_gen.backend import Sampling
from posttrain.chat import end_of_turn_ids
from posttrain.errors import PosttrainError
from posttrain.models import load_tokenizer, resolve_model

INSTALL_HINT = "the vllm backend needs `pip install posttrain[vllm]` on a CUDA machine"


class VLLMUnavailable(PosttrainError, ImportError):
    """vllm cannot be imported here (not installed, or no CUDA build)."""


class VLLMBackend:
    """In-process vLLM engine. `model` is any spec `posttrain.models` resolves (folder, .gguf, pkg://, tiny://, hub
    id). The named arguments and `engine_kwargs` (e.g. `quantization`, `max_num_seqs`, `pipeline_parallel_size`)
    go to `vllm.LLM`; `seed` seeds the engine, `Sampling.seed` each request. `batch_size` is accepted and ignored:
    the recipe schema's default backend dict carries it into any backend, and vLLM's scheduler batches by itself."""

    # Prompts per generate shard unless the recipe says (generate.shard_size): a shard is one call, and the
    # engine drains at its end, so thousands of prompts (x K sequences) keep it full; resume stays per shard.
    default_shard_size = 2048

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enable_prefix_caching: bool = True,
        seed: int = 0,
        batch_size: int | None = None,
        **engine_kwargs,
    ):
        try:
            import vllm
        except ImportError as err:
            raise VLLMUnavailable(f"{INSTALL_HINT} (import vllm failed: {err})") from err
        self.model_spec = model
        path = resolve_model(model)
        self.tokenizer = load_tokenizer(path)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self._sampling_params = vllm.SamplingParams
        self.llm = vllm.LLM(
            model=path,
            tokenizer=path,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            dtype=dtype,
            enable_prefix_caching=enable_prefix_caching,
            seed=seed,
            **engine_kwargs,
        )
        self._stats = {"engine": "vllm", "tensor_parallel_size": tensor_parallel_size,
                       "prefix_caching": enable_prefix_caching, "prompts": 0, "completion_tokens": 0}

    def generate(self, prompts: list[list[dict]], n: int, sampling: Sampling) -> list[list[dict]]:
        """`n` completions per chat prompt, as `HFBackend.generate` returns them: dicts with text, prompt_tokens,
        completion_tokens (end-of-turn token excluded) and finish_reason ("stop" or "length"). One engine call for
        the whole batch. Prompt i's samples are seeded `sampling.seed + i * n + j` (vLLM adds j to a request's seed
        for its j-th sample), so no two samples of a call share a random stream, even for repeated prompts."""
        greedy = sampling.temperature == 0
        k = 1 if greedy else n  # greedy gives one answer per prompt: repeated below rather than recomputed
        token_prompts = [
            {"prompt_token_ids": list(self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True)["input_ids"])}
            for messages in prompts
        ]
        params = [
            self._sampling_params(
                n=k,
                temperature=sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=sampling.seed + i * n,
                stop_token_ids=list(self.stop_ids),
                # vLLM returns the top-k of the raw log-softmax (logprobs_mode "raw_logprobs", its default), plus
                # the sampled token when it is not among them; _completion keeps the k by rank
                **({"logprobs": sampling.top_logprobs} if sampling.top_logprobs else {}),
            )
            for i in range(len(prompts))
        ]
        results = self.llm.generate(token_prompts, params, use_tqdm=False)
        out = []
        for prompt, result in zip(token_prompts, results):
            samples = [self._completion(c, len(prompt["prompt_token_ids"]), sampling.top_logprobs)
                       for c in sorted(result.outputs, key=lambda c: getattr(c, "index", 0))]
            out.append([dict(samples[0]) for _ in range(n)] if greedy else samples)
        self._stats["prompts"] += len(prompts)
        self._stats["completion_tokens"] += sum(s["completion_tokens"] for samples in out for s in samples)
        return out

    def _completion(self, output, prompt_tokens: int, top_logprobs: int = 0) -> dict:
        """One vLLM CompletionOutput -> our dict. vLLM keeps the token that stopped a sample in `token_ids`;
        the body ends before it, as in the hf backend. With `top_logprobs` = k, the KD fields
        (data_gen/logprobs.py) from `output.logprobs`: per generated token, the k entries of rank 1..k."""
        ids = list(output.token_ids)
        stop_at = next((t for t, tok in enumerate(ids) if tok in self.stop_ids), None)
        if stop_at is not None:
            body, reason = ids[:stop_at], "stop"
        elif output.finish_reason == "stop":
            # Stopped by an eos id vLLM read from generation_config.json that the chat template does not use:
            # that id (stop_reason None, or the id itself) is the last token; a stop string leaves it all.
            stop_reason = getattr(output, "stop_reason", None)
            body, reason = (ids if isinstance(stop_reason, str) else ids[:-1]), "stop"
        elif output.finish_reason == "length":
            body, reason = ids, "length"
        else:
            raise RuntimeError(f"vLLM finished a sample with finish_reason={output.finish_reason!r} "
                               "(aborted?); no completion is recorded for it")
        sample = {
            "text": self.tokenizer.decode(body, skip_special_tokens=True),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(body),
            "finish_reason": reason,
        }
        if top_logprobs:
            from data_gen.logprobs import sample_fields

            steps = [sorted((p.rank, t, p.logprob) for t, p in step.items() if p.rank <= top_logprobs)[:top_logprobs]
                     for step in output.logprobs or []]
            if len(steps) < len(body) or any(len(s) < top_logprobs for s in steps):
                raise RuntimeError(f"vLLM returned log-probs for {len(steps)} of {len(ids)} tokens or fewer than "
                                   f"{top_logprobs} a token (raise the engine's max_logprobs)")
            stopped = ids[len(body)] if len(ids) > len(body) else None
            sample |= sample_fields(body, [[t for _, t, _ in s] for s in steps], [[v for _, _, v in s] for s in steps],
                                    stopped=stopped,
                                    chosen=[step[t].logprob for step, t in zip(output.logprobs, ids)])
        return sample

    def stats(self) -> dict:
        """Counters for the generate stage's manifest metrics."""
        return dict(self._stats)
