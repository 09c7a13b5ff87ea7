"""A trained reward model as a Reward: `RewardModelScorer(model)(prompts, responses) -> scores`.

The reward model is a Hugging Face `AutoModelForSequenceClassification` with one output (num_labels=1), as
`posttrain.train.rm` trains it (Llama 3 section 4.1.2). Its input is built by `rm_inputs`, the one function that
both the trainer and this scorer call, so a response is scored exactly as the model saw responses in training:

- a tokenizer with a chat template (Llama, ChatML, ...): the templated conversation, prompt turns + the assistant
  response; a decoder reads the reward at the last token, the response's end-of-turn;
- a tokenizer without one (BERT-like encoders such as all-MiniLM-L6-v2): a text pair, the prompt rendered as
  "role: content" lines, then the response; the encoder reads it at [CLS].

Inputs longer than `max_length` tokens are cut (see `rm_inputs`). Scoring pads on the right, as TRL's collator does
in training: a decoder given left padding would see its tokens at other positions and score them differently.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

NORM_FILE = "posttrain_reward.json"  # written next to the weights by posttrain.train.rm


def length_limit(tokenizer, max_length: int | None) -> int | None:
    """The tighter of `max_length` and the tokenizer's own limit (BERT: 512 positions); None when neither sets one."""
    own = tokenizer.model_max_length if tokenizer.model_max_length < 10**9 else None
    limits = [n for n in (max_length, own) if n]
    return min(limits) if limits else None


def render_prompt(messages: list[dict]) -> str:
    """Prompt turns as "role: content" lines: the first text of a text-pair input."""
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in messages)


def rm_inputs(tokenizer, messages: list[dict], response: str, max_length: int | None = None) -> dict[str, list[int]]:
    """The reward model's input for one response: `{"input_ids": [...]}`, plus `"token_type_ids"` for text pairs.

    Inputs: the RM's tokenizer, the prompt turns (chat message dicts) before the response, the response text, and
    an optional length limit in tokens. With a chat template, an over-long conversation keeps its last tokens (the
    reward is read at the end, and the response is what is being judged); a text pair is cut longest-first.
    """
    limit = length_limit(tokenizer, max_length)
    if getattr(tokenizer, "chat_template", None):
        conversation = [*messages, {"role": "assistant", "content": response}]
        ids = list(tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"])
        return {"input_ids": ids[-limit:] if limit and len(ids) > limit else ids}
    enc = tokenizer(
        render_prompt(messages), response, truncation="longest_first" if limit else False, max_length=limit
    )
    out = {"input_ids": list(enc["input_ids"])}
    if "token_type_ids" in enc:
        out["token_type_ids"] = list(enc["token_type_ids"])
    return out


def _pad_right(rows: list[list[int]], value: int):
    import torch

    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def score_inputs(model, inputs: list[dict], pad_token_id: int, batch_size: int = 16, desc: str = "RM scoring") -> list[float]:
    """Scores `rm_inputs` encodings with a sequence-classification model, in batches of similar length (longest
    first, so running out of memory happens at once); returns the scores in the order of `inputs`."""
    import torch
    from tqdm.auto import tqdm

    scores: list[float] = [0.0] * len(inputs)
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i]["input_ids"]))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), tqdm(total=len(inputs), desc=desc, unit="resp", leave=False) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = {
                    "input_ids": _pad_right([inputs[i]["input_ids"] for i in idx], pad_token_id),
                    "attention_mask": _pad_right([[1] * len(inputs[i]["input_ids"]) for i in idx], 0),
                }
                if "token_type_ids" in inputs[idx[0]]:
                    batch["token_type_ids"] = _pad_right([inputs[i]["token_type_ids"] for i in idx], 0)
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
                for i, s in zip(idx, logits[:, 0].float().cpu().tolist()):
                    scores[i] = s
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return scores


def prepare_tokenizer(tokenizer, model=None):
    """Sequence classifiers need a pad id (a decoder finds its last real token by it): Llama-style tokenizers
    have none, so eos serves, as TRL's RewardTrainer does; the model config gets the same id."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


class RewardModelScorer:
    """Reward (see reward/protocol.py) backed by a sequence-classification reward model.

    `model`: any spec `posttrain.models.resolve_model` understands (a folder written by the rm stage, pkg://,
    a hub id). `normalize=True` returns (score - mean) / std with the mean and std of the model's scores on its
    training responses, read from `<model folder>/posttrain_reward.json`; only models trained by posttrain have it.
    `device="auto"` takes the GPU when there is one. Every response gets a float (never None).

    >>> rm = RewardModelScorer("runs/demo/round_1/00_rm/model")  # doctest: +SKIP
    >>> rm([{"messages": [{"role": "user", "content": "Hi"}]}], ["Hello! How can I help?"])  # doctest: +SKIP
    [1.73]
    """

    def __init__(
        self,
        model: str,
        batch_size: int = 16,
        max_length: int = 1024,
        normalize: bool = False,
        device: str = "auto",
        dtype: str = "float32",
    ):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from posttrain.models import resolve_model

        path = resolve_model(model)
        self.batch_size, self.max_length = batch_size, max_length
        self.shift, self.scale = 0.0, 1.0
        if normalize:
            stats_file = Path(path) / NORM_FILE
            if not stats_file.is_file():
                raise ValueError(
                    f"RewardModelScorer(normalize=True) needs {stats_file}: the mean and std of the model's scores "
                    "on its training data, written by posttrain's rm stage. This model was not trained there; "
                    "use normalize=False."
                )
            stats = json.loads(stats_file.read_text())
            self.shift, self.scale = stats["score_mean"], stats["score_std"]
            if not (self.scale > 0 and math.isfinite(self.scale)):
                raise ValueError(f"{stats_file}: score_std={self.scale} cannot normalise scores")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=getattr(torch, dtype)
        ).to(device)
        prepare_tokenizer(self.tokenizer, self.model)
        self.model.eval()

    def encode(self, prompts: list[dict], responses: list[str]) -> list[dict[str, list[int]]]:
        """The model inputs `__call__` scores (the same `rm_inputs` the trainer used)."""
        return [
            rm_inputs(self.tokenizer, p["messages"], r, self.max_length) for p, r in zip(prompts, responses, strict=True)
        ]

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        if not responses:
            return []
        raw = score_inputs(self.model, self.encode(prompts, responses), self.tokenizer.pad_token_id, self.batch_size)
        return [(s - self.shift) / self.scale for s in raw]
