"""Chat format: the Llama 3.1 template, and the formatting tokens of any chat template.

Llama 3.1 dialog format (Meta's llama-models `ChatFormat`, paper section 4.1.1)::

    <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|> ... (one block per message)

Message dicts used throughout posttrain:

- ``{"role": "system" | "user" | "assistant" | "ipython", "content": str}``. ``"tool"`` is accepted as an alias of
  ``"ipython"`` (as llama-models does); ipython messages carry tool results and end with ``<|eot_id|>``.
- A builtin tool call is an assistant message with a ``"tool_call"`` string holding the call's code (for example
  ``'brave_search.call(query="...")'`` or Python for the code interpreter). It is rendered
  ``<|python_tag|>{content}{tool_call}<|eom_id|>``: ``<|eom_id|>`` ("end of message") says the model waits for the
  tool result rather than ending its turn. ``content`` is usually empty there.
- Content is copied verbatim (no trimming), and no "Cutting Knowledge Date" system prompt is injected.

Assistant content and its terminator sit inside ``{% generation %}`` so that
``apply_chat_template(..., return_assistant_tokens_mask=True)`` (TRL's assistant-only SFT loss) marks them.

For any tokenizer (Llama, ChatML, ...) `format_tokens` finds the header and termination tokens by rendering a probe
conversation, and `formatting_mask` marks them by position: the Llama 3 DPO loss masks header and termination
tokens out of both chosen and rejected responses (paper section 4.1.4).
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "ipython")
BOS = "<|begin_of_text|>"
PYTHON_TAG = "<|python_tag|>"

# `-` on every tag: transformers renders with trim_blocks/lstrip_blocks, and we want no stray whitespace at all.
LLAMA3_CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{%- if role not in ['system', 'user', 'assistant', 'ipython'] -%}"
    "{{- raise_exception('Unknown role: ' + role) -}}"
    "{%- endif -%}"
    "{%- set content = message['content'] if message['content'] is defined and message['content'] is not none"
    " else '' -%}"
    "{%- if content is not string -%}"
    "{{- raise_exception('Message content must be a string') -}}"
    "{%- endif -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' -}}"
    "{%- if role == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if message['tool_call'] is defined and message['tool_call'] is not none -%}"
    "{{- '<|python_tag|>' + content + message['tool_call'] + '<|eom_id|>' -}}"
    "{%- else -%}"
    "{{- content + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{- content + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

# Tokens that end a turn or a message in common chat formats; used to complete `FormatTokens.end_ids` with
# terminators that the probe conversation cannot show (Llama's <|eom_id|> appears only after a tool call).
KNOWN_TERMINATORS = ("<|eom_id|>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "</s>")


def render_llama3(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """Render `messages` in the Llama 3.1 format; the same string as `LLAMA3_CHAT_TEMPLATE` gives.

    Inputs: message dicts as described in the module docstring. Output: the prompt text, starting with
    <|begin_of_text|>. Raises ValueError on an unknown role and TypeError on non-string content.
    """
    parts = [BOS]
    for message in messages:
        role = "ipython" if message["role"] == "tool" else message["role"]
        if role not in ROLES:
            raise ValueError(f"Unknown role: {role}")
        content = message.get("content")
        content = "" if content is None else content
        if not isinstance(content, str):
            raise TypeError("Message content must be a string")
        parts.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n")
        if role == "assistant" and message.get("tool_call") is not None:
            parts.append(f"{PYTHON_TAG}{content}{message['tool_call']}<|eom_id|>")
        else:
            parts.append(f"{content}<|eot_id|>")
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


@dataclass(frozen=True)
class FormatTokens:
    """Token ids that frame messages: headers (role markers) and ends (turn/message terminators)."""

    header_ids: frozenset[int]
    end_ids: frozenset[int]

    @property
    def all_ids(self) -> frozenset[int]:
        return self.header_ids | self.end_ids


# Probe contents: plain words that no template rewrites and that never contain a special token.
_PROBE = [
    ("system", "probesystemzero"),
    ("user", "probeuserone"),
    ("assistant", "probeassistantone"),
    ("user", "probeusertwo"),
    ("assistant", "probeassistanttwo"),
]


def _template_source(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template: set tokenizer.chat_template "
            "(posttrain.chat.LLAMA3_CHAT_TEMPLATE for Llama 3 models)"
        )
    return "\n".join(template.values()) if isinstance(template, dict) else template


def _special_ids(tokenizer) -> dict[str, int]:
    """Text -> id of every special token (added tokens flagged special, plus the named special tokens)."""
    special = {tok.content: i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    for token in tokenizer.all_special_tokens:
        special.setdefault(token, tokenizer.convert_tokens_to_ids(token))
    return special


def _render_probe(tokenizer) -> tuple[str, list[tuple[str, str]]]:
    def render(probe):
        messages = [{"role": role, "content": content} for role, content in probe]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # a foreign template's raise_exception, e.g. Gemma rejecting a system message
            return None
        return text if all(content in text for _, content in probe) else None

    for probe in (_PROBE, _PROBE[1:]):  # with a system message, then without (for templates that drop or reject it)
        if (text := render(probe)) is not None:
            return text, probe
    raise ValueError("the chat template did not render a plain user/assistant conversation verbatim")


def format_tokens(tokenizer) -> FormatTokens:
    """Find the header and end (termination) token ids of `tokenizer`'s chat template.

    Renders a probe conversation and reads the special tokens between message contents: the first one after an
    assistant content is an end token, the others are header tokens. Known terminators written literally in the
    template source (e.g. <|eom_id|>) are added to the end ids. <|python_tag|> is never a formatting token (the model
    must learn to emit it); bos is not one where it only opens the text, but is where the template also uses it
    as a header (SmolLM2's bos is <|im_start|>).
    Input: a tokenizer with a chat template (ValueError otherwise). Output: FormatTokens.
    """
    source = _template_source(tokenizer)
    special = _special_ids(tokenizer)
    special_ids = set(special.values()) - {special.get(PYTHON_TAG)}
    text, probe = _render_probe(tokenizer)

    # Split the rendered text into the gaps around the probe contents; gap i precedes content i.
    gaps, cursor = [], 0
    for _, content in probe:
        at = text.index(content, cursor)
        gaps.append(text[cursor:at])
        cursor = at + len(content)
    gaps.append(text[cursor:])

    end_ids, seen = set(), set()
    for i, gap in enumerate(gaps):
        ids = [t for t in tokenizer.encode(gap, add_special_tokens=False) if t in special_ids]
        if i == 0 and ids and ids[0] == tokenizer.bos_token_id:
            ids = ids[1:]
        if ids and i > 0 and probe[i - 1][0] == "assistant":
            end_ids.add(ids[0])
        seen.update(ids)
    end_ids |= {special[t] for t in KNOWN_TERMINATORS if t in special and t in source} & special_ids
    return FormatTokens(header_ids=frozenset(seen - end_ids), end_ids=frozenset(end_ids))


def end_of_turn_ids(tokenizer) -> list[int]:
    """Ids that end an assistant turn, for `generate(eos_token_id=...)`: end ids plus eos, sorted, no repeats."""
    ids = set(format_tokens(tokenizer).end_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def formatting_mask(tokenizer, input_ids: list[int], tokens: FormatTokens | None = None) -> list[bool]:
    """Mark, by position, the header spans and end tokens in `input_ids` (True = formatting token).

    A header span opens at a header token and closes, inclusively, at the first later token that is either another
    header token or contains a newline. That one rule covers both families:
    Llama 3 ``<|start_header_id|> assistant <|end_header_id|>`` closes at <|end_header_id|> (the "\\n\\n" after it
    is ordinary text and stays unmasked); ChatML ``<|im_start|> assistant \\n`` has no closing special token and closes
    at the newline token. Every end token is marked wherever it appears. Content tokens are never marked, except by
    templates whose header token is followed directly by content with no newline (Mistral's [INST] ... [/INST],
    where the marked span is the user prompt, outside any response).
    Inputs: the tokenizer (with a chat template), one sequence of ids, and optionally `format_tokens(tokenizer)`
    computed once by a caller that masks many sequences. Output: one bool per id.
    """
    tokens = tokens or format_tokens(tokenizer)
    newline = {t: "\n" in tokenizer.decode([t]) for t in set(input_ids)}
    mask, in_header = [], False
    for t in input_ids:
        if in_header:
            mask.append(True)
            in_header = not (t in tokens.header_ids or newline[t])
        elif t in tokens.header_ids:
            mask.append(True)
            in_header = True
        else:
            mask.append(t in tokens.end_ids)
    return mask


# ---- message content is text --------------------------------------------------------------------------------


class ContentAsText:
    """Mixin: `apply_chat_template(..., tokenize=True)` defaults to `sanitize_control_tokens=True`."""

    def apply_chat_template(self, conversation, *args, **kwargs):
        if kwargs.get("tokenize", True) and not kwargs.get("return_assistant_tokens_mask"):
            kwargs.setdefault("sanitize_control_tokens", True)
        return super().apply_chat_template(conversation, *args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        """Saved as the tokenizer class it wraps: tokenizer_config.json names a class transformers knows."""
        wrapper, self.__class__ = self.__class__, self.__class__.posttrain_base
        try:
            return self.save_pretrained(*args, **kwargs)
        finally:
            self.__class__ = wrapper


def _content_as_text_class(base: type) -> type:
    name = f"ContentAsText{base.__name__}"
    if name not in globals():  # one class per tokenizer class, importable by name, so tokenizers still pickle
        globals()[name] = type(name, (ContentAsText, base),
                               {"__module__": __name__, "__qualname__": name, "posttrain_base": base})
    return globals()[name]


def __getattr__(name: str):
    """`ContentAsText<TokenizerClass>` for unpickling in a process that has not made that class yet."""
    if name.startswith("ContentAsText") and name != "ContentAsText":
        import transformers

        return _content_as_text_class(getattr(transformers, name.removeprefix("ContentAsText")))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def content_as_text(tokenizer):
    """Make `tokenizer.apply_chat_template(..., tokenize=True)` encode message content as plain text for every caller
    (TRL's SFT and DPO trainers, the generation backends, the reward model), as Meta's ChatFormat does: content that
    spells a control token ("<|eot_id|>", "<|start_header_id|>", "<|im_end|>") stays those characters and never
    becomes the token, so it can neither end a turn early nor open a header that the DPO format mask would then
    take out of the log-ratio. transformers does the work (`sanitize_control_tokens=True`); this makes it the
    default by giving the tokenizer a subclass of its own class. Rendering to text (`tokenize=False`) and the
    assistant-token mask, which transformers cannot combine with it, are left as they were. Returns the tokenizer."""
    if not isinstance(tokenizer, ContentAsText):
        tokenizer.__class__ = _content_as_text_class(type(tokenizer))
    return tokenizer
