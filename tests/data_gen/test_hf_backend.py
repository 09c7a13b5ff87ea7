"""The local `hf` generation backend on the tiny model."""

import pytest
import torch

from data_gen.hf_backend import HFBackend, Sampling

PROMPTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count to three."}],
]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(str(tiny_model_dir), batch_size=2)


def test_k_completions_per_prompt_with_token_counts(backend):
    out = backend.generate(PROMPTS, n=3, sampling=Sampling(max_new_tokens=8, seed=1))
    assert [len(samples) for samples in out] == [3, 3, 3]
    for samples in out:
        for s in samples:
            assert set(s) == {"text", "prompt_tokens", "completion_tokens", "finish_reason"}
            assert 0 <= s["completion_tokens"] <= 8 and s["prompt_tokens"] > 0
    # The system prompt makes the second prompt longer.
    assert out[1][0]["prompt_tokens"] > out[0][0]["prompt_tokens"]


def test_same_seed_same_texts_other_seed_other_texts(backend):
    a = backend.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=12, seed=7))
    b = backend.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=12, seed=7))
    c = backend.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=12, seed=8))
    assert a == b
    assert a != c


def test_greedy_at_temperature_zero_gives_identical_samples(backend):
    out = backend.generate(PROMPTS[:1], n=2, sampling=Sampling(temperature=0, max_new_tokens=6))
    assert out[0][0]["text"] == out[0][1]["text"]


class _FixedHead(torch.nn.Module):
    """An lm_head whose logits favour one token by `bias`, so the test decides when generation stops."""

    def __init__(self, vocab, token, bias):
        super().__init__()
        self.vocab, self.token, self.bias = vocab, token, bias

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., self.token] = self.bias
        return logits


def test_stops_at_the_templates_end_of_turn(tiny_model_dir):
    backend = HFBackend(str(tiny_model_dir), batch_size=4)
    eot = backend.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in backend.stop_ids
    vocab = backend.model.config.vocab_size

    backend.model.lm_head = _FixedHead(vocab, eot, 100.0)
    out = backend.generate(PROMPTS, n=2, sampling=Sampling(max_new_tokens=10))
    assert {(s["finish_reason"], s["completion_tokens"], s["text"]) for samples in out for s in samples} == {
        ("stop", 0, "")
    }

    backend.model.lm_head = _FixedHead(vocab, eot, -100.0)  # end-of-turn never sampled
    out = backend.generate(PROMPTS, n=1, sampling=Sampling(max_new_tokens=10))
    assert {(s["finish_reason"], s["completion_tokens"]) for samples in out for s in samples} == {("length", 10)}
