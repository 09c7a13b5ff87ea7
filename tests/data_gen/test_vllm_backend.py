"""The `vllm` generation backend.

On CPU: the clear error without vllm, and the prompt rendering, sampling parameters and output mapping against a
fake `vllm` module. On a CUDA machine with vllm installed: the real engine on the tiny model, against the hf backend.
"""

import sys
import types
from types import SimpleNamespace

import pytest

from data_gen.backend import Sampling
from data_gen.hf_backend import HFBackend
from data_gen.vllm_backend import INSTALL_HINT, VLLMBackend
from posttrain.chat import end_of_turn_ids, render_llama3
from posttrain.errors import PosttrainError
from posttrain.models import resolve_model

TINY = "tiny://layers=2,hidden=64,seed=0"
PROMPTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count to three."}],
]


def test_without_vllm_construction_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, whether or not it is installed
    with pytest.raises(ImportError, match=r"needs `pip install posttrain\[vllm\]` on a CUDA machine") as info:
        VLLMBackend(TINY)
    assert isinstance(info.value, PosttrainError)  # the CLI prints it as a plain message
    assert INSTALL_HINT in str(info.value)


def test_recipe_snippet_passes_target_validation_without_vllm(monkeypatch):
    from recipes.validate import ALLOWED_PREFIXES, check_target

    monkeypatch.setitem(sys.modules, "vllm", None)
    # The schema's default backend dict carries batch_size into whatever _target_ the recipe names.
    node = {"_target_": "data_gen.vllm_backend.VLLMBackend", "tensor_parallel_size": 8, "batch_size": 8}
    assert check_target("generate.backend", node, ALLOWED_PREFIXES, ("model", "journal_dir")) is None


# --- the output mapping, on a fake vllm module ---------------------------------------------------------------------


class FakeLLM:
    """Mimics vllm.LLM: records its arguments and calls; `script(prompt_ids, params, j)` decides sample j as
    (token_ids, finish_reason, stop_reason). Completions come back in reverse index order, as a check."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls = []
        self.script = None

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        results = []
        for prompt, sp in zip(prompts, params, strict=True):
            outputs = []
            for j in range(sp.n):
                ids, reason, stop_reason = self.script(prompt["prompt_token_ids"], sp, j)
                outputs.append(SimpleNamespace(index=j, token_ids=tuple(ids), text="(vllm's own text, unused)",
                                               finish_reason=reason, stop_reason=stop_reason, logprobs=None))
            results.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=outputs[::-1]))
        return results


@pytest.fixture
def fake(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", module)
    backend = VLLMBackend(TINY, tensor_parallel_size=8, batch_size=8, quantization="fp8")
    tok = backend.tokenizer
    ids = {name: tok.convert_tokens_to_ids(name) for name in ("<|eot_id|>", "<|eom_id|>", "<|finetune_right_pad_id|>")}
    return SimpleNamespace(backend=backend, llm=backend.llm, tok=tok, ids=ids,
                           words=lambda s: tok.encode(s, add_special_tokens=False))


def test_engine_gets_the_resolved_model_and_settings(fake):
    path = resolve_model(TINY)
    assert fake.llm.kwargs == dict(
        model=path, tokenizer=path, tensor_parallel_size=8, gpu_memory_utilization=0.9, max_model_len=None,
        dtype="auto", enable_prefix_caching=True, seed=0, quantization="fp8",
    )  # batch_size is accepted and not passed on


def test_one_engine_call_with_template_token_prompts_and_per_prompt_params(fake):
    fake.llm.script = lambda prompt, sp, j: (fake.words("ok"), "length", None)
    out = fake.backend.generate(PROMPTS, n=4, sampling=Sampling(temperature=0.7, top_p=0.9, max_new_tokens=5, seed=11))
    assert len(fake.llm.calls) == 1
    prompts, params = fake.llm.calls[0]
    for messages, prompt, samples in zip(PROMPTS, prompts, out, strict=True):
        # The chat template with the generation prompt, as token ids: what the hf backend feeds the model.
        assert fake.tok.decode(prompt["prompt_token_ids"]) == render_llama3(messages, add_generation_prompt=True)
        assert [s["prompt_tokens"] for s in samples] == [len(prompt["prompt_token_ids"])] * 4
    for sp in params:
        assert (sp.n, sp.temperature, sp.top_p, sp.max_tokens) == (4, 0.7, 0.9, 5)
        assert sp.stop_token_ids == end_of_turn_ids(fake.tok)
    # vLLM seeds sample j of a request with seed + j: prompt i starts at seed + i * n, so no stream repeats.
    assert [sp.seed for sp in params] == [11, 15, 19]
    assert fake.backend.stats()["prompts"] == 3


def test_finish_reasons_and_texts_without_the_stop_token(fake):
    eot, eom, pad = fake.ids["<|eot_id|>"], fake.ids["<|eom_id|>"], fake.ids["<|finetune_right_pad_id|>"]
    hello = fake.words("hello world")
    cases = [
        (hello + [eot], "stop", eot),  # the template's end of turn (vLLM keeps it in token_ids)
        (hello + [eom], "stop", eom),  # end of message (tool call)
        (hello, "length", None),  # max_tokens reached
        ([eot], "stop", eot),  # empty answer
        (hello + [pad], "stop", None),  # an eos from generation_config.json that the template does not use
        (hello, "stop", "world"),  # a stop string (kept out of the text by vLLM already)
    ]
    fake.llm.script = lambda prompt, sp, j: cases[j]
    out = fake.backend.generate(PROMPTS[:1], n=len(cases), sampling=Sampling(max_new_tokens=len(hello) + 1))
    got = [(s["text"], s["completion_tokens"], s["finish_reason"]) for s in out[0]]
    n = len(hello)
    assert got == [("hello world", n, "stop"), ("hello world", n, "stop"), ("hello world", n, "length"),
                   ("", 0, "stop"), ("hello world", n, "stop"), ("hello world", n, "stop")]


def test_greedy_asks_one_sample_and_repeats_it(fake):
    fake.llm.script = lambda prompt, sp, j: (fake.words("same") + [fake.ids["<|eot_id|>"]], "stop", None)
    out = fake.backend.generate(PROMPTS, n=3, sampling=Sampling(temperature=0, top_p=0.5, max_new_tokens=4))
    assert [(sp.n, sp.temperature, sp.top_p) for sp in fake.llm.calls[0][1]] == [(1, 0, 1.0)] * 3
    assert [[s["text"] for s in samples] for samples in out] == [["same"] * 3] * 3
    assert out[0][0] is not out[0][1]  # separate dicts, as the hf backend returns


def test_aborted_sample_is_an_error_not_a_row(fake):
    fake.llm.script = lambda prompt, sp, j: ([], "abort", None)
    with pytest.raises(RuntimeError, match="abort"):
        fake.backend.generate(PROMPTS[:1], n=1, sampling=Sampling())


def test_top_logprobs_are_the_k_of_rank_one_to_k_with_the_stop_tokens_step(fake):
    eot = fake.ids["<|eot_id|>"]
    hello = fake.words("hello world")
    ids = hello + [eot]
    fake.llm.script = lambda prompt, sp, j: (ids, "stop", eot)
    with pytest.raises(RuntimeError, match="max_logprobs"):  # an engine that returned none
        fake.backend.generate(PROMPTS[:1], n=1, sampling=Sampling(top_logprobs=2))
    assert fake.llm.calls[-1][1][0].logprobs == 2

    def logprob(value, rank):
        return SimpleNamespace(logprob=value, rank=rank)

    # vLLM adds the sampled token to the k when it is not among them (here at rank 7)
    steps = [{t: logprob(-3.0, 7), 100 + s: logprob(-0.1, 1), 200 + s: logprob(-0.5, 2)} for s, t in enumerate(ids)]
    output = SimpleNamespace(index=0, token_ids=tuple(ids), finish_reason="stop", stop_reason=eot, logprobs=steps)
    got = fake.backend._completion(output, 5, top_logprobs=2)
    assert got["text"] == "hello world" and got["completion_ids"] == hello and got["stop_token_id"] == eot
    assert got["topk_ids"] == [[100 + s, 200 + s] for s in range(len(ids))]
    assert got["topk_logprobs"] == [[-0.1, -0.5]] * len(ids) and got["token_logprobs"] == [-3.0] * len(ids)


# --- the real engine (CUDA machine with vllm installed) --------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("vllm needs a CUDA GPU")
    # float32 so greedy tokens can be compared with the hf backend's float32 ones.
    return VLLMBackend(TINY, dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024, enforce_eager=True)


def test_real_engine_n_samples_finish_reasons_and_seeding(engine):
    sampling = Sampling(temperature=1.0, max_new_tokens=12, seed=3)
    a = engine.generate(PROMPTS, n=4, sampling=sampling)
    assert [len(samples) for samples in a] == [4, 4, 4]
    for samples in a:
        assert len({s["text"] for s in samples}) > 1  # each sample has its own random stream
        for s in samples:
            assert set(s) == {"text", "prompt_tokens", "completion_tokens", "finish_reason"}
            assert s["finish_reason"] in ("stop", "length")
            assert (s["finish_reason"] == "length") == (s["completion_tokens"] == 12)
    assert engine.generate(PROMPTS, n=4, sampling=sampling) == a
    assert engine.generate(PROMPTS, n=4, sampling=Sampling(temperature=1.0, max_new_tokens=12, seed=4)) != a


def test_real_engine_top_logprobs_equal_the_hf_backends(engine):
    sampling = Sampling(temperature=0, max_new_tokens=12, top_logprobs=5)
    hf = HFBackend(TINY, batch_size=2, dtype="float32")  # as the engine above
    for got, want in zip(engine.generate(PROMPTS, 1, sampling), hf.generate(PROMPTS, 1, sampling)):
        assert got[0]["completion_ids"] == want[0]["completion_ids"]
        assert got[0]["topk_ids"] == want[0]["topk_ids"]
        assert sum(got[0]["topk_logprobs"], []) == pytest.approx(sum(want[0]["topk_logprobs"], []), abs=1e-3)


def test_real_engine_greedy_equals_hf_backend_greedy(engine):
    sampling = Sampling(temperature=0, max_new_tokens=16)
    hf = HFBackend(TINY, batch_size=2, dtype="float32")  # as the engine above
    assert engine.generate(PROMPTS, n=2, sampling=sampling) == hf.generate(PROMPTS, n=2, sampling=sampling)


def test_backend_stats_over_ranks_sum_the_counters_and_keep_the_rest():
    from data_gen.generate import _sum_stats

    rank = {"engine": "vllm", "tensor_parallel_size": 8, "prefix_caching": True, "requests": 3, "seconds": 1.5}
    assert _sum_stats([rank]) == rank
    assert _sum_stats([rank, {**rank, "requests": 4}]) == {**rank, "requests": 7, "seconds": 3.0}
