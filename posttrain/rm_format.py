"""How a reward model reads a response: the one input format that training (posttrain.train.rm) and scoring
(reward.rm_scorer.RewardModelScorer) share, so the two cannot drift apart.

- a tokenizer with a chat template (Llama, ChatML, ...): the templated conversation, prompt turns + the assistant
  response; a decoder reads the reward at the last token, the response's end-of-turn;
- a tokenizer without one (BERT-like encoders such as all-MiniLM-L6-v2): a text pair, the prompt rendered as
  "role: content" lines, then the response; the encoder reads it at [CLS].

Inputs longer than `max_length` tokens are cut (see `rm_inputs`). Scoring pads on the right, as TRL's collator does
in training: a decoder given left padding would see its tokens at other positions and score them differently.
"""

from __future__ import annotations

from posttrain.models import pad_with_eos

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


def score_inputs(
    model, inputs: list[dict], pad_token_id: int, batch_size: int = 16, desc: str = "RM scoring"
) -> list[float]:
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
    pad_with_eos(tokenizer)
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer
