"""The local `hf` generation backend on the tiny model."""

import math

import pytest
import torch

from data_gen.backend import Sampling
from data_gen.hf_backend import HFBackend

PROMPTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count to three."}],
]


# The backends here run in float32: the tests compare token for token with transformers' own `generate`, which
# bf16 rounding (different for other batch shapes) would break on a CPU where dtype=auto picks bf16.
FP32 = {"dtype": "float32"}


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(str(tiny_model_dir), batch_size=2, **FP32)


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
    backend = HFBackend(str(tiny_model_dir), batch_size=4, **FP32)
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


# --- prefix sharing: one prefill per prompt, its KV cache shared by the prompt's n samples --------------------------


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    """The old path, `generate(num_return_sequences=n)`, as the reference."""
    return HFBackend(str(tiny_model_dir), batch_size=2, prefix_sharing=False, **FP32)


def test_prefix_shared_sampling_gives_n_completions_deterministically(backend):
    assert backend.prefix_sharing  # the default
    sampling = Sampling(temperature=1.0, max_new_tokens=10, seed=5)
    a = backend.generate(PROMPTS, n=4, sampling=sampling)
    assert [len(samples) for samples in a] == [4, 4, 4]
    for samples in a:
        for s in samples:
            assert 0 <= s["completion_tokens"] <= 10
            assert (s["finish_reason"] == "length") == (s["completion_tokens"] == 10)
    assert len({s["text"] for samples in a for s in samples}) > 1  # sampled, not one answer repeated
    assert backend.generate(PROMPTS, n=4, sampling=sampling) == a


def test_greedy_prefix_shared_tokens_equal_plain_generate_under_left_padding(backend, plain):
    long_system = "You are a helpful assistant. Answer the question briefly and correctly. " * 3
    prompts = [*PROMPTS, [{"role": "system", "content": long_system}, {"role": "user", "content": "Hi."}]]
    enc = backend.tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    lengths = enc["attention_mask"].sum(dim=1)
    assert len(set(lengths.tolist())) == 4  # four lengths in one batch: three rows are left-padded
    # 40 tokens: the random tiny model is nearly position-blind, and shorter runs miss a wrong-positions prefill.
    sampling = Sampling(temperature=0, max_new_tokens=40)
    reference = backend.model.generate(
        **enc,
        do_sample=False,
        max_new_tokens=40,
        eos_token_id=backend.stop_ids,
        pad_token_id=backend.tokenizer.pad_token_id,
    )
    shared, tops = backend._sample(enc["input_ids"], enc["attention_mask"], 1, sampling)
    assert torch.equal(shared, reference) and tops is None
    # And through the public interface, batch size 2 included.
    assert backend.generate(prompts, n=3, sampling=sampling) == plain.generate(prompts, n=3, sampling=sampling)


def _embedded_shapes(backend, prompts, n):
    """Input shapes of every forward through the embeddings during one `generate` call of one new token."""
    shapes = []
    hook = backend.model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: shapes.append(tuple(args[0].shape))
    )
    try:
        out = backend.generate(prompts, n=n, sampling=Sampling(max_new_tokens=1, seed=0))
    finally:
        hook.remove()
    return shapes, [samples[0]["prompt_tokens"] for samples in out]


def test_each_prompt_is_prefilled_once_not_n_times(tiny_model_dir):
    n = 8
    shared, lengths = _embedded_shapes(HFBackend(str(tiny_model_dir), batch_size=1, **FP32), PROMPTS, n)
    # Per prompt: its tokens once; the logits at its last token give every sample's first token (one new token
    # asked: no decoding step runs).
    assert shared == [(1, length) for length in lengths]

    plain, _ = _embedded_shapes(HFBackend(str(tiny_model_dir), batch_size=1, prefix_sharing=False, **FP32),
                                PROMPTS, n)
    assert plain == [(n, length) for length in lengths]  # the old path encodes each prompt n times


class _EndsSometimes(torch.nn.Module):
    """The real lm_head with the end-of-turn token raised, so answers end at different steps."""

    def __init__(self, head, token, bias):
        super().__init__()
        self.head, self.token, self.bias = head, token, bias

    def forward(self, hidden):
        logits = self.head(hidden)
        logits[..., self.token] += self.bias
        return logits


def _decode_feeds(backend, prompts, n, sampling):
    """(the answers, the rows fed to the model at each one-token decoding step)."""
    rows = []
    hook = backend.model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)
    try:
        out = backend.generate(prompts, n=n, sampling=sampling)
    finally:
        hook.remove()
    return out, rows


def test_finished_answers_leave_the_batch_and_greedy_answers_still_equal_generates(tiny_model_dir):
    ours = HFBackend(str(tiny_model_dir), batch_size=4, **FP32)
    plain = HFBackend(str(tiny_model_dir), batch_size=4, prefix_sharing=False, **FP32)
    eot = ours.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    for backend in (ours, plain):
        backend.model.lm_head = _EndsSometimes(backend.model.lm_head, eot, 0.3)
    prompts = [[{"role": "user", "content": f"Question {i}: " + "tell me more " * i}] for i in range(8)]
    greedy = Sampling(temperature=0, max_new_tokens=30)
    out, _ = _decode_feeds(ours, prompts, 1, greedy)
    assert out == plain.generate(prompts, n=1, sampling=greedy)
    lengths = {s["completion_tokens"] for samples in out for s in samples}
    assert len(lengths) >= 2 and {s["finish_reason"] for samples in out for s in samples} == {"stop", "length"}

    # Sampling from the random model's nearly flat distribution: end-of-turn drawn about one step in ten.
    ours.model.lm_head.bias = math.log(0.1 * ours.model.config.vocab_size)
    sampled = Sampling(temperature=1.0, max_new_tokens=30, seed=1)
    out, feeds = _decode_feeds(ours, prompts, 4, sampled)
    answers = [s for samples in out for s in samples]
    assert len({s["completion_tokens"] for s in answers}) > 3
    # Each answer is fed each token it drew but the last (its end-of-turn included; the first token comes from the
    # prefill): no step runs a finished row.
    assert sum(feeds) == sum(s["completion_tokens"] + (s["finish_reason"] == "stop") - 1 for s in answers)
    assert sum(feeds) < len(answers) * max(s["completion_tokens"] for s in answers)
    assert ours.generate(prompts, n=4, sampling=sampled) == out  # still one answer set per seed


def test_draw_samples_the_given_distribution_and_never_a_zero_probability_token():
    from data_gen.hf_backend import draw

    torch.manual_seed(0)
    probs = torch.zeros(4000, 50)
    probs[:, [3, 7, 20, 49]] = torch.tensor([0.5, 0.3, 0.15, 0.05])  # the last token included; others impossible
    counts = torch.bincount(draw(probs), minlength=50).double()
    assert counts.sum() == 4000 and set(counts.nonzero().squeeze(1).tolist()) == {3, 7, 20, 49}
    expected = 4000 * torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    chi2 = float(((counts[[3, 7, 20, 49]] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    # A row whose mass is all on its last token, and unnormalised rows (a total of 2).
    edge = torch.zeros(3, 5)
    edge[0, 4] = 1.0
    edge[1:, 0] = 2.0
    assert draw(edge).tolist() == [4, 0, 0]
    torch.manual_seed(1)
    a = draw(probs[:100])
    torch.manual_seed(1)
    assert torch.equal(a, draw(probs[:100]))  # seeded by torch's generator, like multinomial


def test_auto_dtype_is_bf16_only_where_the_hardware_has_it(tiny_model_dir, monkeypatch, capsys):
    from posttrain import models

    backend = HFBackend(str(tiny_model_dir), batch_size=2)  # dtype=auto
    native = models.native_bf16(backend.device)
    assert backend.dtype == ("bfloat16" if native else "float32")
    assert next(backend.model.parameters()).dtype == getattr(torch, backend.dtype)
    assert backend.stats() == {"engine": "hf", "dtype": backend.dtype, "device": backend.device, "kept": False}
    assert (f"runs in {backend.dtype} on {backend.device} (dtype=auto: {native or 'no native bf16 here'})"
            in capsys.readouterr().out)
    # Sampling in bf16 is as repeatable per seed as in fp32.
    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=3)
    assert backend.generate(PROMPTS, n=2, sampling=sampling) == backend.generate(PROMPTS, n=2, sampling=sampling)

    # The CPU's flags decide: AMX-BF16 or AVX512-BF16 (recent Xeons), else fp32 (bf16 would be emulated).
    def cpu_with(**flags):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_bf16": False, "avx512_bf16": False, **flags},
                            raising=False)

    cpu_with()
    assert models.inference_dtype("auto", "cpu") == (torch.float32, "dtype=auto: no native bf16 here")
    cpu_with(avx512_bf16=True)
    assert models.inference_dtype("auto", "cpu") == (torch.bfloat16, "dtype=auto: AVX512-BF16")
    cpu_with(amx_bf16=True, avx512_bf16=True)
    assert models.inference_dtype("auto", "cpu") == (torch.bfloat16, "dtype=auto: AMX-BF16")
    assert models.inference_dtype("float32", "cpu") == (torch.float32, "dtype=float32")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.inference_dtype("auto", "cuda")[0] == torch.float32


def test_draw_refuses_a_row_without_probability_mass():
    from data_gen.hf_backend import draw

    for bad in (torch.zeros(2, 5), torch.full((1, 5), float("nan"))):
        with pytest.raises(ValueError, match="NaN, infinite or all zero"):
            draw(bad)


def test_a_kept_model_serves_the_next_stage_until_released(tiny_model_dir, tmp_path):
    """posttrain.models.keeping_models (the round loop: round N's eval keeps the policy it answered with for round
    N + 1's generate): a backend on the kept model, precision and device reuses its weights and samples exactly as
    a freshly loaded model; anything else, a changed folder, a release, another kind of backend or a launched
    process loads again, never holding two."""
    import gc
    import shutil
    import weakref

    from data_gen.backend import build_backend
    from posttrain import models
    from posttrain.train.launch import run_training

    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=5)
    folder = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, folder)
    fresh = HFBackend(str(folder), batch_size=3, **FP32)
    expected = fresh.generate(PROMPTS, n=2, sampling=sampling)
    models.keep_model(fresh.model)  # outside keeping_models: nothing is kept
    assert not fresh.kept and HFBackend(str(folder), **FP32).model is not fresh.model
    del fresh

    def kept(**kwargs) -> bool:
        return HFBackend(str(folder), **kwargs).kept

    with models.keeping_models():
        first = HFBackend(str(folder), batch_size=2, **FP32)  # the eval's
        first.generate(PROMPTS, n=2, sampling=Sampling(temperature=0.0, max_new_tokens=8, seed=0))
        assert not kept(**FP32)  # loaded, not kept: only what a stage hands to keep_model is
        models.keep_model(first.model)
        second = HFBackend(str(folder), batch_size=3, **FP32)  # the next generate's: another batch size
        assert second.kept and second.model is first.model and second.stats()["kept"] is True
        assert second.generate(PROMPTS, n=2, sampling=sampling) == expected
        assert kept(**FP32)  # still kept until released
        gone = weakref.ref(first.model)
        del first, second
        assert not kept(dtype="bfloat16")  # another precision: loaded, and the kept one dropped
        gc.collect()
        assert gone() is None

        def keep_one():
            models.keep_model(HFBackend(str(folder), **FP32).model)

        keep_one()
        (folder / "generation_config.json").touch()  # the folder changed (a stage written again)
        assert not kept(**FP32)
        for release in (models.release_models,
                        lambda: build_backend({"_target_": "types.SimpleNamespace"}, "some-model"),  # not hf
                        lambda: run_training("json.tool", {"probe": 1}, tmp_path, {"launcher": "direct",
                                                                                  "preload": False})):
            keep_one()
            release()
            assert not kept(**FP32)
        keep_one()
        assert isinstance(build_backend({"_target_": "data_gen.hf_backend.HFBackend", **FP32}, str(folder)), HFBackend)
        assert kept(**FP32)  # the hf backend itself takes it
    assert not kept(**FP32)  # the context closed: nothing kept
