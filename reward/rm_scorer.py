"""A trained reward model as a Reward: `RewardModelScorer(model)(prompts, responses) -> scores`.

The reward model is a Hugging Face `AutoModelForSequenceClassification` with one output (num_labels=1), as
`posttrain.train.rm` trains it (Llama 3 section 4.1.2). Its inputs are built by `posttrain.rm_format.rm_inputs`,
the function the trainer calls too, so a response is scored exactly as the model saw responses in training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from posttrain.rm_format import NORM_FILE, prepare_tokenizer, rm_inputs, score_inputs

__all__ = ["NORM_FILE", "RewardModelScorer", "rm_inputs"]


class RewardModelScorer:
    """Reward (see reward/protocol.py) backed by a sequence-classification reward model.

    `model`: any spec `posttrain.models.resolve_model` understands (a folder written by the rm stage, pkg://,
    a hub id). `normalize=True` returns (score - mean) / std with the mean and std of the model's scores on its
    training responses, read from `<model folder>/posttrain_reward.json`; only models trained by posttrain have it.
    `device="auto"` takes the GPU when there is one; `device_map` (e.g. "auto") instead spreads the model over
    every GPU the process sees (accelerate's big-model loading), for an RM larger than one GPU. Every response gets
    a float (never None).

    >>> rm = RewardModelScorer("runs/demo/round_1/00_rm/model")  # doctest: +SKIP
    >>> rm([{"messages": [{"role": "user", "content": "Hi"}]}], ["Hello! How can I help?"])  # doctest: +SKIP
    [1.73]
    """

    unhashed = ("device_map",)  # where it runs, not what it computes: out of the stage hash (`device` was always in)

    def __init__(
        self,
        model: str,
        batch_size: int = 16,
        max_length: int = 1024,
        normalize: bool = False,
        device: str = "auto",
        dtype: str = "float32",
        device_map: str | dict | None = None,
    ):
        import torch
        from transformers import AutoModelForSequenceClassification

        from posttrain.models import load_tokenizer, resolve_model, torch_dtype

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
        self.tokenizer = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch_dtype(dtype), **({"device_map": device_map} if device_map else {})
        )
        if not device_map:
            self.model.to(device)
        prepare_tokenizer(self.tokenizer, self.model)
        self.model.eval()

    def encode(self, prompts: list[dict], responses: list[str]) -> list[dict[str, list[int]]]:
        """The model inputs `__call__` scores (the same `rm_inputs` the trainer used)."""
        return [
            rm_inputs(self.tokenizer, p["messages"], r, self.max_length)
            for p, r in zip(prompts, responses, strict=True)
        ]

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        if not responses:
            return []
        raw = score_inputs(self.model, self.encode(prompts, responses), self.tokenizer.pad_token_id, self.batch_size)
        return [(s - self.shift) / self.scale for s in raw]
