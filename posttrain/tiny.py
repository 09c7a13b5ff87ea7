"""Tiny Llama models for tests: a byte-level BPE tokenizer with the Llama 3.1 special tokens and chat template,
and a random-init LlamaForCausalLM saved as a plain Hugging Face folder. Everything is built offline.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.chat import LLAMA3_CHAT_TEMPLATE

SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
)
VOCAB_SIZE = 512  # 256 bytes + merges + the special tokens, appended last as in Llama 3

# Llama 3's pre-tokenizer split (tiktoken cl100k-style): contractions, words, 1-3 digit groups, punctuation, spaces.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog.

A conversation has roles: system, user, assistant and ipython (the tool results).
The system prompt sets the rules; the user asks; the assistant answers.

You are a helpful assistant. Answer the question briefly and correctly.
What is the capital of France? The capital of France is Paris.
Please write a short poem about the sea, the wind and the stars.
How many days are there in a week? There are 7 days in a week.
Compute 12 + 30 = 42, then 42 * 2 = 84 and 100 - 1 = 99.
I don't know the answer, but I'll try my best to help you.
Here is a Python function: def add(a, b): return a + b
The model generates K responses and the reward model picks the best one.
Reinforcement learning from human feedback aligns language models with people.
She said: "It's raining again; we'll stay inside and read books."
Numbers: 0 1 2 3 4 5 6 7 8 9 10 2024 3.14 1,000,000 50% $20
Punctuation: ( ) [ ] { } < > ! ? . , ; : ' " - _ / \\ | @ # & * + = ~ ^ `
Thank you! Could you explain why the sky is blue during the day?
Sunlight scatters off molecules in the air, and blue light scatters the most.
Translate "good morning" into Spanish: buenos dias.
List three colors: red, green and blue.
Write a haiku about autumn leaves falling on a quiet river.
The user asked for a summary, so the assistant wrote one paragraph.
Is 17 a prime number? Yes, 17 is prime because it has no divisors but 1 and itself.
The train leaves at 9:45 and arrives at 13:20 in the evening.
Water boils at 100 degrees Celsius at sea level.
Tell me a joke about programmers. Why do programmers prefer dark mode? Because light attracts bugs.
import math
print(math.sqrt(16))
for i in range(10):
    print(i * i)
Search the web for the weather in London tomorrow.
brave_search.call(query="weather in London tomorrow")
The result was sunny with a high of 21 degrees.
We train with supervised fine-tuning first and direct preference optimization second.
Chosen and rejected responses form a preference pair for each prompt.
My favourite fruits are apples, bananas, cherries and grapes.
When was the first moon landing? It happened in July 1969.
Good answers are helpful, honest and harmless.

The end.
"""


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (vocab 512) on the embedded corpus, with the Llama 3.1 special tokens and template.

    bos <|begin_of_text|>, eos <|eot_id|>, pad <|finetune_right_pad_id|>. No post-processor: the chat template
    writes <|begin_of_text|> itself, so neither the template nor plain `tokenizer(text)` adds a (second) bos.
    Deterministic: every call gives the same vocabulary.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(SPECIAL_TOKENS),
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The text between header tokens ("assistant", then "\n\n") is in every chat: weight it so that, as in
    # Llama 3, role names and "\n\n" become single tokens.
    headers = [f"{role}\n\n" for role in ("system", "user", "assistant", "ipython")] * 20
    tok.train_from_iterator([CORPUS, *headers], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=1024,
    )


def corpus_chats() -> list[list[dict]]:
    """The CORPUS as single-turn chats: each non-empty line is the assistant's answer to the line before it."""
    lines = [line.strip() for line in CORPUS.splitlines() if line.strip()]
    return [
        [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        for question, answer in zip(lines[:-1], lines[1:])
    ]


def pretrain_on_corpus(model, tokenizer, *, steps: int, lr: float = 3e-3, batch_size: int = 16, seed: int = 0):
    """Train `model` in place for `steps` AdamW steps of plain causal LM (every token but padding) on
    `corpus_chats()` rendered with the chat template, batches drawn by a generator seeded with `seed`.
    On CPU in float32; deterministic for the same arguments on the same machine. Returns the model in eval mode."""
    rows = [tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
            for chat in corpus_chats()]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)  # linear decay
    model.train()
    for _ in range(steps):
        pick = torch.randperm(len(rows), generator=generator)[:batch_size]
        cols = int(mask[pick].sum(dim=1).max())  # right-padded: trim to the batch's longest row
        loss = model(input_ids=ids[pick, :cols], attention_mask=mask[pick, :cols], labels=labels[pick, :cols]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def _is_built(path: Path) -> bool:
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


def build_tiny(
    out_dir: str | os.PathLike,
    *,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    init_std: float = 0.02,
    seed: int = 0,
    max_position_embeddings: int = 1024,
    pretrain_steps: int = 0,
    pretrain_lr: float = 3e-3,
) -> Path:
    """Build a random-init tiny Llama 3 model + tokenizer and save them to `out_dir` (a Hugging Face folder).

    Same arguments give identical weights (seeded init). The folder appears atomically (built in a temporary
    sibling, then renamed); a folder already holding a finished build is returned as is. Returns the path.

    `pretrain_steps > 0` then trains the random model briefly on the tokenizer's CORPUS (`pretrain_on_corpus`:
    causal LM on chat-formatted corpus lines, seeded, on CPU: about 15 s for 300 steps of the default size), so
    that it answers with corpus-like ASCII text ended by <|eot_id|> instead of random byte tokens: a policy that
    can improve on its own samples (iterative self-training tests). 0 (the default) keeps the random init.
    """
    out = Path(out_dir)
    if _is_built(out):
        return out
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=init_std,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if pretrain_steps > 0:
        pretrain_on_corpus(model, tokenizer, steps=pretrain_steps, lr=pretrain_lr, seed=seed)
    eot, eom = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"])
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[eot, eom], pad_token_id=tokenizer.pad_token_id
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists() and not any(out.iterdir()):
            out.rmdir()  # rename cannot replace a directory, even an empty one, on every platform
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if _is_built(out):  # another process finished the same build first
            return out
        raise
    return out
