"""Token-level distillation in the SFT stage (`sft.kd`), from the teacher's top-k log-probs stored by the generate
stage (`generate.teacher_logprobs`, data_gen/logprobs.py).

Loss, per response token t (the tokens TRL's prompt-completion SFT trains on), averaged over those tokens as TRL
averages its cross-entropy:

    (1 - w) * CE_t + w * KL(p_t || q_t)      where the token has the teacher's log-probs
    CE_t                                     where it has none (your `sft.data`, a row whose tokens were realigned)

p_t is the teacher's distribution over its stored top-k tokens, renormalised over them after dividing the log-probs
by the temperature T; q_t is the student's softmax(logits / T) over the whole vocabulary, read at those k ids.
The mass the teacher put outside its top k is dropped (p is renormalised over the k), while the student's mass
outside them still counts against it through q's normalisation: KL(p || q) >= -log(sum of q over the k) >= 0, so
the student is pushed to put its mass on the teacher's k tokens in the teacher's proportions. With k = the
vocabulary it is exactly the forward KL of the full distributions. Compared with TRL's GKD (the teacher's full
logits, live in the trainer, a generalised JSD between forward and reverse KL, on-policy samples) this is the
forward-KL end (GKD's beta = 0) on the teacher's own samples, offline, from k stored values; DistillKit's offline
mode also trains on a sparse top-k of the teacher's distribution, stored with its own compression (polynomial
approximation and bit-packing, denser than float16) and with a choice of losses. No T^2 factor is applied (as in
GKD).

Alignment: the student is trained on the teacher's own token ids (`completion_ids`), not on a re-tokenization of
its text, so each stored distribution sits at the position it was computed for; the template's end-of-turn tokens
follow as TRL renders them. A row whose text the template changes (trimmed whitespace) cannot be aligned: it
trains with cross-entropy only and is counted (`unaligned`). Held-out rows are evaluated by TRL's own
cross-entropy on the text, so `eval_loss` means the same with and without KD.
"""

from __future__ import annotations

import os
from pathlib import Path

# The generate stage's columns of a row with the teacher's log-probs (data_gen/logprobs.py writes them)
KD_COLUMNS = ("completion_ids", "topk_ids", "topk_logprobs")
TEACHER_KEYS = ("kd_start", "kd_ids", "kd_logprobs")


def _ids(tokenizer, messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def tokenize_row(row: dict, tokenizer, max_length: int | None) -> dict:
    """One generation row (messages, text, and the KD columns when it has them) -> input_ids, labels (-100 on the
    prompt), kd_start (the index in input_ids of the first token with teacher log-probs; -1: none), kd_ids,
    kd_logprobs, unaligned (the row had teacher log-probs that could not be placed)."""
    prompt = _ids(tokenizer, row["messages"], add_generation_prompt=True)
    full = _ids(tokenizer, row["messages"] + [{"role": "assistant", "content": row["text"]}])
    start = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    tail = full[start:]
    kd_ids, kd_lps, unaligned = [], [], False
    if row.get("topk_ids"):
        text_ids = tokenizer.encode(row["text"], add_special_tokens=False)
        if start == len(prompt) and tail[: len(text_ids)] == text_ids:
            tail = list(row["completion_ids"]) + tail[len(text_ids):]
            kd_ids, kd_lps = row["topk_ids"][: len(tail)], row["topk_logprobs"][: len(tail)]
        else:
            unaligned = True
    input_ids, labels = full[:start] + tail, [-100] * start + tail
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        kept = max(0, max_length - start)
        kd_ids, kd_lps = kd_ids[:kept], kd_lps[:kept]
    return {"input_ids": input_ids, "labels": labels, "kd_start": start if kd_ids else -1, "kd_ids": kd_ids,
            "kd_logprobs": kd_lps, "kd_tokens": len(kd_ids), "unaligned": unaligned}


def build_train(paths: list[str], held: list[bool], tokenizer, max_length: int | None, cache_dir: Path,
                vocab: int | None = None):
    """The training rows of `paths` (generation-format `datasets` folders; `held`: one flag per row of all of them
    in order, True for a held-out row) tokenized by `tokenize_row`; a teacher id at or above `vocab` (the student's
    output size; default: the tokenizer's length) is an error naming the row. Folders without the KD columns (your
    sft.data) give cross-entropy rows. Written as Arrow under `cache_dir` (one file per folder and rank),
    memory-mapped, so the teacher's log-probs are not held as Python objects. Returns (dataset, counts for the
    stage's metrics)."""
    import datasets

    features = datasets.Features({
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "kd_start": datasets.Value("int32"),
        "kd_ids": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
        "kd_logprobs": datasets.Sequence(datasets.Sequence(datasets.Value("float16"))),
        "kd_tokens": datasets.Value("int32"),
        "unaligned": datasets.Value("bool"),
    })
    cache_dir.mkdir(parents=True, exist_ok=True)
    vocab = vocab or len(tokenizer)
    parts, offset = [], 0
    for i, path in enumerate(paths):
        ds = datasets.load_from_disk(path)
        keep = [j for j in range(len(ds)) if not held[offset + j]]
        offset += len(ds)
        columns = ["messages", "text"] + ([*KD_COLUMNS] if set(KD_COLUMNS) <= set(ds.column_names) else [])
        ds = ds.select_columns(columns).select(keep)

        def tokenize(row, index, path=path, keep=keep):
            out = tokenize_row(row, tokenizer, max_length)
            bad = max((max(r) for r in out["kd_ids"] if r), default=-1)
            if bad >= vocab:
                raise ValueError(f"{path}: row {keep[index]}: teacher token id {bad} is outside the student's "
                                 f"vocabulary of {vocab}: the teacher and the student do not share a tokenizer")
            return out

        parts.append(ds.map(tokenize, with_indices=True, remove_columns=columns, features=features,
                            cache_file_name=str(cache_dir / f"{i}-rank{os.environ.get('RANK', '0')}.arrow"),
                            load_from_cache_file=False, desc="KD rows"))
    train = datasets.concatenate_datasets(parts)
    starts, unaligned = train["kd_start"], train["unaligned"]  # small columns: the log-probs stay in Arrow
    counts = {"rows_with_teacher": sum(s >= 0 for s in starts), "unaligned": sum(unaligned),
              "tokens_with_teacher": sum(train["kd_tokens"])}
    return train.remove_columns(["unaligned", "kd_tokens"]), counts


class Collator:
    """TRL's language-modeling collator (padding, attention mask, -100 labels) plus the teacher's top-k as
    [batch, length, k] tensors at the logits positions that predict the teacher's tokens (`teacher_mask`). Rows
    whose k is smaller (rounds collected with another `generate.teacher_logprobs`) are padded with log-prob -1e4,
    which the renormalised p gives no mass."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        teacher = [tuple(e.get(key) for key in TEACHER_KEYS) for e in examples]
        batch = self.base([{k: v for k, v in e.items() if k not in TEACHER_KEYS} for e in examples])
        k = max((len(step) for _, ids, _ in teacher if ids for step in ids), default=0)
        if not k:
            return batch
        rows, length = batch["input_ids"].shape
        ids = torch.zeros((rows, length, k), dtype=torch.long)
        logprobs = torch.full((rows, length, k), -1e4, dtype=torch.float32)
        mask = torch.zeros((rows, length), dtype=torch.bool)
        for b, (start, top_ids, top_lps) in enumerate(teacher):
            if not top_ids:
                continue
            span = slice(start - 1, start - 1 + len(top_ids))  # the logits at position p predict token p + 1
            mask[b, span] = True
            if all(len(step) == k for step in top_ids):  # one k for the whole row: one copy
                ids[b, span] = torch.tensor(top_ids, dtype=torch.long)
                logprobs[b, span] = torch.tensor(top_lps, dtype=torch.float32)
                continue
            for j, (step_ids, step_lps) in enumerate(zip(top_ids, top_lps)):
                ids[b, start - 1 + j, : len(step_ids)] = torch.tensor(step_ids, dtype=torch.long)
                logprobs[b, start - 1 + j, : len(step_lps)] = torch.tensor(step_lps, dtype=torch.float32)
        batch.update(teacher_ids=ids, teacher_logprobs=logprobs, teacher_mask=mask)
        return batch


def kd_terms(logits, labels, teacher_ids, teacher_logprobs, teacher_mask, temperature: float):
    """Per response token: cross-entropy and, where `teacher_mask`, KL(p || q) (module docstring). `logits`
    [B, L, V], `labels` [B, L] (-100: not trained on), teacher tensors at the logits positions. Returns
    (ce [N], kl [N], has_teacher [N]) over the N trained positions."""
    import torch

    logits, labels = logits[:, :-1], labels[:, 1:]
    trained = labels != -100
    logprobs = torch.log_softmax(logits[trained].float(), dim=-1)  # one full-vocabulary softmax per token
    ce = -logprobs.gather(-1, labels[trained][:, None]).squeeze(-1)
    has = teacher_mask[:, :-1][trained]
    kl = torch.zeros_like(ce)
    if has.any():
        student = logprobs[has] if temperature == 1 else torch.log_softmax(
            logits[trained][has].float() / temperature, dim=-1)
        q = student.gather(-1, teacher_ids[:, :-1][trained][has])
        p_log = torch.log_softmax(teacher_logprobs[:, :-1][trained][has] / temperature, dim=-1)
        kl = kl.masked_scatter(has, (p_log.exp() * (p_log - q)).sum(-1))
    return ce, kl, has


def kd_loss(ce, kl, has, weight: float, tokens):
    """The batch's loss from `kd_terms`: (1 - weight) x CE + weight x KL where a token has the teacher's
    log-probs, CE elsewhere, summed and divided by `tokens` (TRL's normalisation: the trained tokens of the whole
    accumulated batch)."""
    import torch

    per_token = ce * (1 - weight * has.float()) + weight * kl
    return per_token.sum() / torch.as_tensor(tokens).clamp(min=1)


def trainer_class():
    """SFTTrainer with the KD loss in training (TRL's own loss in evaluation)."""
    from trl import SFTTrainer

    class KDSFTTrainer(SFTTrainer):
        def __init__(self, *args, kd_weight: float, kd_temperature: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd_weight, self.kd_temperature = kd_weight, kd_temperature

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            teacher = {k: inputs.pop(k) for k in ("teacher_ids", "teacher_logprobs", "teacher_mask") if k in inputs}
            if not model.training or not teacher:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
            ce, kl, has = kd_terms(outputs.logits, labels, teacher["teacher_ids"], teacher["teacher_logprobs"],
                                   teacher["teacher_mask"], self.kd_temperature)
            tokens = ce.numel() if num_items_in_batch is None else num_items_in_batch
            loss = kd_loss(ce, kl, has, self.kd_weight, tokens)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            metrics = self._metrics["train"]
            metrics["ce_loss"].append(ce.detach().mean().item() if ce.numel() else 0.0)
            metrics["kd_kl"].append(kl[has].detach().mean().item() if has.any() else 0.0)
            return (loss, outputs) if return_outputs else loss

    return KDSFTTrainer

