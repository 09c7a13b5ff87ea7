"""The Llama 3.1 chat format, its assistant mask, and format-token detection on Llama and ChatML tokenizers."""

import pytest

from posttrain.chat import (
    LLAMA3_CHAT_TEMPLATE,
    end_of_turn_ids,
    format_tokens,
    formatting_mask,
    render_llama3,
)
from posttrain.tiny import build_tiny_tokenizer

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BASIC = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
TOOL_ROUND_TRIP = [
    {"role": "system", "content": "Environment: ipython\nTools: brave_search"},
    {"role": "user", "content": "Weather in London?"},
    {"role": "assistant", "content": "", "tool_call": 'brave_search.call(query="weather in London")'},
    {"role": "ipython", "content": '{"result": "sunny, 21C"}'},
    {"role": "assistant", "content": "It is sunny and 21C."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def make_chatml(bos=None):
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML_TEMPLATE
    tok.eos_token = "<|im_end|>"
    if bos:
        tok.bos_token = bos
    return tok


@pytest.fixture(scope="module")
def chatml_tok():
    return make_chatml()


def ids_of(tok, *names):
    return [tok.convert_tokens_to_ids(n) for n in names]


def test_render_matches_official_llama31_format():
    assert render_llama3(BASIC) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
    )
    assert render_llama3(BASIC[:2], add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_render_tool_call_round_trip():
    assert render_llama3(TOOL_ROUND_TRIP) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nTools: brave_search<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in London?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '<|python_tag|>brave_search.call(query="weather in London")<|eom_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"result": "sunny, 21C"}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is sunny and 21C.<|eot_id|>"
    )
    # "tool" is an alias of "ipython", as in llama-models.
    aliased = [dict(m, role="tool") if m["role"] == "ipython" else m for m in TOOL_ROUND_TRIP]
    assert render_llama3(aliased) == render_llama3(TOOL_ROUND_TRIP)


@pytest.mark.parametrize("messages", [BASIC, BASIC[:2], TOOL_ROUND_TRIP, BASIC[1:]])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_template_equals_python_renderer(tok, messages, add_generation_prompt):
    assert tok.chat_template == LLAMA3_CHAT_TEMPLATE
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert rendered == render_llama3(messages, add_generation_prompt=add_generation_prompt)


def test_bad_messages_raise(tok):
    with pytest.raises(ValueError, match="Unknown role"):
        render_llama3([{"role": "robot", "content": "hi"}])
    with pytest.raises(Exception, match="Unknown role"):
        tok.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


def test_assistant_mask_marks_content_and_terminator(tok):
    out = tok.apply_chat_template(TOOL_ROUND_TRIP, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    marked = [i for i, m in zip(ids, mask) if m]
    expected = tok.encode(
        '<|python_tag|>brave_search.call(query="weather in London")<|eom_id|>It is sunny and 21C.<|eot_id|>',
        add_special_tokens=False,
    )
    assert marked == expected
    # The marked tokens are exactly the two spans, each ending the sequence or followed by a header.
    eom, eot = ids_of(tok, "<|eom_id|>", "<|eot_id|>")
    assert mask[ids.index(eom) + 1] == 0 and ids[-1] == eot and mask[-1] == 1


def test_format_tokens_llama(tok):
    fmt = format_tokens(tok)
    assert fmt.header_ids == set(ids_of(tok, "<|start_header_id|>", "<|end_header_id|>"))
    assert fmt.end_ids == set(ids_of(tok, "<|eot_id|>", "<|eom_id|>"))
    assert fmt.all_ids == fmt.header_ids | fmt.end_ids
    assert end_of_turn_ids(tok) == sorted(ids_of(tok, "<|eot_id|>", "<|eom_id|>"))


def test_format_tokens_chatml(chatml_tok):
    fmt = format_tokens(chatml_tok)
    assert fmt.header_ids == {chatml_tok.convert_tokens_to_ids("<|im_start|>")}
    assert fmt.end_ids == {chatml_tok.convert_tokens_to_ids("<|im_end|>")}
    assert end_of_turn_ids(chatml_tok) == [chatml_tok.convert_tokens_to_ids("<|im_end|>")]


def test_bos_that_doubles_as_header_is_a_header():
    tok = make_chatml(bos="<|im_start|>")  # as in SmolLM2, whose bos is <|im_start|>
    assert format_tokens(tok).header_ids == {tok.convert_tokens_to_ids("<|im_start|>")}


def test_format_tokens_needs_a_template():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        format_tokens(tok)


def encode_pieces(tok, pieces):
    """Ids and expected mask of (text, is_formatting) pieces; checks they tokenize as the whole text does."""
    ids, mask = [], []
    for text, flag in pieces:
        piece = tok.encode(text, add_special_tokens=False)
        ids += piece
        mask += [flag] * len(piece)
    assert ids == tok.encode("".join(t for t, _ in pieces), add_special_tokens=False)
    return ids, mask


def test_formatting_mask_llama(tok):
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Paris.\nYes"}]
    ids, expected = encode_pieces(
        tok,
        [
            ("<|begin_of_text|>", False),
            ("<|start_header_id|>user<|end_header_id|>", True),
            ("\n\nHi there", False),
            ("<|eot_id|>", True),
            ("<|start_header_id|>assistant<|end_header_id|>", True),
            ("\n\nParis.\nYes", False),
            ("<|eot_id|>", True),
        ],
    )
    assert ids == tok.apply_chat_template(messages)["input_ids"]
    assert formatting_mask(tok, ids) == expected
    assert formatting_mask(tok, ids, format_tokens(tok)) == expected
    assert [i for i, m in enumerate(expected) if m][:3] == [1, 2, 3]  # <|start_header_id|> user <|end_header_id|>


def test_formatting_mask_chatml(chatml_tok):
    tok = chatml_tok
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": " Paris.\nYes"}]
    ids, expected = encode_pieces(
        tok,
        [
            ("<|im_start|>user\n", True),
            ("Hi there", False),
            ("<|im_end|>", True),
            ("\n", False),
            ("<|im_start|>assistant\n", True),
            (" Paris.\nYes", False),
            ("<|im_end|>", True),
            ("\n", False),
        ],
    )
    assert ids == tok.apply_chat_template(messages)["input_ids"]
    assert formatting_mask(tok, ids) == expected
    assert [i for i, m in enumerate(expected) if m][:3] == [0, 1, 2]  # <|im_start|> user \n


def test_loaded_tokenizers_encode_message_content_as_text(tiny_model_dir):
    """posttrain.models.load_tokenizer: ordinary content encodes exactly as the chat template does; content that
    spells a control token stays text (transformers' sanitize_control_tokens), wherever apply_chat_template is
    called with tokenize=True."""
    from transformers import AutoTokenizer

    from posttrain.models import load_tokenizer

    tok, raw = load_tokenizer(str(tiny_model_dir)), AutoTokenizer.from_pretrained(str(tiny_model_dir))
    for content in ["Hello there!", " leading", "two\n\nparas", "", "émoji 🎉"]:
        chat = [{"role": "user", "content": content}, {"role": "assistant", "content": content + " ok"}]
        assert tok.apply_chat_template(chat)["input_ids"] == raw.apply_chat_template(chat)["input_ids"]
    chat = [{"role": "user", "content": "end <|eot_id|> here <|start_header_id|>"}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    plain = raw.apply_chat_template(chat, add_generation_prompt=True)["input_ids"]
    eot, header = tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>"])
    assert ids.count(eot) == 1 and ids.count(header) == 2  # the template's own: user turn, generation prompt
    assert plain.count(eot) == 2 and plain.count(header) == 3  # transformers' default would make them tokens
    assert "end <|eot_id|> here <|start_header_id|>" in tok.decode(ids)
    mask = formatting_mask(tok, ids)
    assert sum(mask) == sum(formatting_mask(tok, tok.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True)["input_ids"]))  # only the real ones
    batch = tok.apply_chat_template([chat, chat[:1]], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2
    # Still a tokenizer that pickles and copies (datasets and multiprocessing need it), keeping the behaviour.
    import copy
    import pickle

    for again in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert again.apply_chat_template(chat, add_generation_prompt=True)["input_ids"] == ids
    # Saved under the class it wraps, so any transformers loads it as before (a BERT keeps its segment ids).
    import json

    tok.save_pretrained(tiny_model_dir.parent / "saved_tok")
    saved = json.loads((tiny_model_dir.parent / "saved_tok" / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == type(raw).__name__ and type(tok).__name__ != type(raw).__name__
