"""Tiny test models: deterministic builds, loadable folders, no double BOS."""

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from posttrain.chat import LLAMA3_CHAT_TEMPLATE, end_of_turn_ids, render_llama3
from posttrain.tiny import SPECIAL_TOKENS, build_tiny, build_tiny_tokenizer

SMALL = dict(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64)


def test_tokenizer_is_deterministic_and_llama_like():
    tok = build_tiny_tokenizer()
    assert tok.backend_tokenizer.to_str() == build_tiny_tokenizer().backend_tokenizer.to_str()
    assert len(tok) == 512
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|eot_id|>"
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    # Like Meta's tokenizer.json: special added tokens at the end of the vocab, only bos/eos/pad named.
    specials = {i: t.content for i, t in tok.added_tokens_decoder.items() if t.special}
    assert list(specials.values()) == list(SPECIAL_TOKENS) and min(specials) == 512 - len(SPECIAL_TOKENS)
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    # Byte-level: any text round-trips; role names and "\n\n" are single tokens, as in Llama 3.
    text = "Hello, world! 12345 café 🙂\n\nend"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok.encode("assistant\n\n", add_special_tokens=False)) == 2


def test_build_is_deterministic(tmp_path):
    a = load_file(build_tiny(tmp_path / "a", **SMALL) / "model.safetensors")
    b = load_file(build_tiny(tmp_path / "b", **SMALL) / "model.safetensors")
    c = load_file(build_tiny(tmp_path / "c", **SMALL, seed=1) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if "norm" not in k)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left behind


def test_finished_build_is_reused(tmp_path):
    path = build_tiny(tmp_path / "m", **SMALL)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny(tmp_path / "m", **SMALL) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_saved_folder_loads_and_runs(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 4, 2)
    assert cfg.vocab_size == len(tok) and not cfg.tie_word_embeddings
    ids = (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id)
    assert ids == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    gen = GenerationConfig.from_pretrained(tiny_model_dir)
    assert sorted(gen.eos_token_id) == end_of_turn_ids(tok)

    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_no_double_bos(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids = tok.apply_chat_template(messages, tokenize=True)["input_ids"]
    assert ids == tok.encode(render_llama3(messages), add_special_tokens=False)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.bos_token_id not in tok("hi")["input_ids"]
