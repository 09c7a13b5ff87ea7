"""Token-level distillation: the teacher's top-k log-probs as the generate stage stores them (data_gen/logprobs.py),
and the KD loss of the SFT stage (posttrain/train/kd.py), on the tiny models (vocabulary 512)."""

import dataclasses
import shutil

import datasets
import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from data_gen.backend import Sampling
from data_gen.hf_backend import HFBackend
from data_gen.logprobs import KD_COLUMNS, kd_features, same_vocabulary
from posttrain.models import load_tokenizer, resolve_model
from posttrain.train.kd import Collator, kd_loss, kd_terms, tokenize_row

TEACHER = "tiny://layers=2,hidden=64,seed=1,init_std=0.3"
PROMPTS = [
    [{"role": "user", "content": "Say hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count to three."}],
]


@pytest.fixture(scope="module")
def teacher():
    # float32: the tests compare the stored log-probs with a full forward to 1e-3, tighter than bf16's rounding
    return HFBackend(TEACHER, batch_size=2, dtype="float32")


def _prompt_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def _stored(samples: list[dict]) -> list[dict]:
    """The samples' KD columns written and read back as the generate stage stores them (int32, float16)."""
    rows = [{c: s[c] for c in KD_COLUMNS} for s in samples]
    return datasets.Dataset.from_list(rows, features=datasets.Features(kd_features())).to_list()


@pytest.fixture(scope="module")
def samples(teacher):
    sampling = Sampling(temperature=0.7, max_new_tokens=16, seed=4, top_logprobs=20)  # answers of both ends
    out = teacher.generate(PROMPTS, 2, sampling)
    plain = teacher.generate(PROMPTS, 2, dataclasses.replace(sampling, top_logprobs=0))
    assert [[s["text"] for s in p] for p in out] == [[s["text"] for s in p] for p in plain]  # same draws
    return [(PROMPTS[i], s) for i, p in enumerate(out) for s in p]


def test_stored_topk_are_the_teachers_log_softmax_at_those_ids(teacher, samples):
    stored = _stored([s for _, s in samples])
    assert any(s["finish_reason"] == "stop" for _, s in samples) and any(
        s["finish_reason"] == "length" for _, s in samples)
    for (messages, s), row in zip(samples, stored):
        assert teacher.tokenizer.decode(row["completion_ids"], skip_special_tokens=True) == s["text"]
        # one distribution per step taken: the end-of-turn token's step too
        assert len(row["topk_ids"]) == s["completion_tokens"] + (s["finish_reason"] == "stop")
        prompt = _prompt_ids(teacher.tokenizer, messages)
        with torch.no_grad():
            logits = teacher.model(torch.tensor([prompt + row["completion_ids"]])).logits[0]
        reference = torch.log_softmax(logits.float(), -1)[len(prompt) - 1:]  # the positions that predict the answer
        for step, (ids, lps) in enumerate(zip(row["topk_ids"], row["topk_logprobs"])):
            want, want_ids = reference[step].topk(20)
            assert ids == want_ids.tolist()
            # as the backend returns them (float32): within 1e-4
            assert (torch.tensor(s["topk_logprobs"][step]) - want).abs().max() < 1e-4
            got = torch.tensor(lps)
            # float16 storage: within 1e-3 of each value, relative (float16 keeps ~5e-4 of it)
            assert ((got - want).abs() <= 1e-3 * want.abs().clamp(min=1)).all(), (step, got, want)


def test_kd_at_full_vocabulary_equals_the_forward_kl_by_hand():
    torch.manual_seed(0)
    vocab, length = 512, 7
    student = torch.randn(2, length, vocab) * 3
    teacher_logits = torch.randn(2, length, vocab) * 3
    labels = torch.randint(0, vocab, (2, length))
    labels[0, :3], labels[1, 5:] = -100, -100  # a prompt; padding
    trained = labels[:, 1:] != -100  # by logits position
    mask = torch.zeros(2, length, dtype=torch.bool)
    mask[:, :-1] = trained
    for temperature in (1.0, 2.0):
        t_lp, t_ids = torch.log_softmax(teacher_logits, -1).sort(-1, descending=True)
        ce, kl, has = kd_terms(student, labels, t_ids, t_lp, mask, temperature)
        assert has.all() and len(kl) == trained.sum()
        p = torch.log_softmax(teacher_logits[:, :-1][trained] / temperature, -1)
        q = torch.log_softmax(student[:, :-1][trained] / temperature, -1)
        by_hand = (p.exp() * (p - q)).sum(-1)
        assert torch.allclose(kl, by_hand, atol=1e-5)
        assert torch.allclose(kl, torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1),
                              atol=1e-5)
        assert torch.allclose(ce, torch.nn.functional.cross_entropy(student[:, :-1][trained],
                                                                    labels[:, 1:][trained], reduction="none"))
        # weight 1: the loss is the mean KL; weight 0: the mean cross-entropy, as TRL computes it
        assert kd_loss(ce, kl, has, 1.0, len(ce)) == pytest.approx(by_hand.mean().item(), rel=1e-5)
        assert kd_loss(ce, kl, has, 0.0, len(ce)) == pytest.approx(ce.mean().item(), rel=1e-6)
    # top-k renormalised: never negative, zero when the student's distribution over the k is the teacher's and
    # it puts nothing outside them
    top = 8
    ce, kl, has = kd_terms(student, labels, t_ids[..., :top], t_lp[..., :top], mask, 1.0)
    assert (kl >= -1e-6).all() and kl.mean() > 0.1
    only_top = torch.full_like(teacher_logits, -1e4).scatter(-1, t_ids[..., :top], t_lp[..., :top])
    _, kl_same, _ = kd_terms(only_top, labels, t_ids[..., :top], t_lp[..., :top], mask, 1.0)
    assert kl_same.abs().max() < 1e-5


def test_rows_align_each_stored_distribution_with_the_token_it_predicted(teacher, samples):
    """The teacher as its own student: at every KD position q over the top k is the stored distribution before
    renormalising, so KL(p || q) = -log(its mass over the k) (0 at k = vocabulary); one position off and it is far
    from that. A row without the teacher's log-probs (user data) trains with cross-entropy only."""
    tok = teacher.tokenizer
    stored = _stored([s for _, s in samples])
    rows = [tokenize_row({"messages": m, "text": s["text"], **row}, tok, 256) for (m, s), row in zip(samples, stored)]
    plain = tokenize_row({"messages": PROMPTS[0], "text": "A plain answer."}, tok, 256)
    assert plain["kd_start"] == -1 and not plain["kd_ids"]
    for row, (messages, s) in zip(rows, samples):
        start = row["kd_start"]
        assert start == len(_prompt_ids(tok, messages)) and not row["unaligned"]
        assert row["input_ids"][start:start + s["completion_tokens"]] == s["completion_ids"]
        assert row["labels"][:start] == [-100] * start
    collate = Collator(DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id))
    batch = collate([*rows, plain])
    assert not batch["teacher_mask"][-1].any()  # the plain row
    with torch.no_grad():
        logits = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    args = (batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_mask"], 1.0)
    _, kl, has = kd_terms(logits, *args)
    assert has.sum() == sum(len(r["kd_ids"]) for r in rows)
    trained = batch["labels"][:, 1:] != -100
    mass = -torch.logsumexp(batch["teacher_logprobs"][:, :-1][trained][has], -1)
    assert (kl[has] - mass).abs().max() < 1e-3
    _, shifted, _ = kd_terms(torch.roll(logits, 1, dims=1), *args)
    assert (shifted[has] - mass).abs().mean() > 0.1


def test_truncation_keeps_the_distributions_inside_max_length(teacher, samples):
    messages, s = next((m, s) for m, s in samples if s["completion_tokens"] > 4)
    row = _stored([s])[0]
    start = len(_prompt_ids(teacher.tokenizer, messages))
    cut = tokenize_row({"messages": messages, "text": s["text"], **row}, teacher.tokenizer, start + 3)
    assert len(cut["input_ids"]) == start + 3 and len(cut["kd_ids"]) == 3


def test_same_vocabulary_names_the_difference(tmp_path):
    tiny = load_tokenizer(TEACHER)
    assert same_vocabulary(tiny, load_tokenizer("tiny://layers=2,hidden=64,seed=0")) is None
    other = tmp_path / "other"
    shutil.copytree(resolve_model(TEACHER), other)
    changed = load_tokenizer(str(other))
    changed.add_tokens(["<|extra_teacher_token|>"])
    changed.save_pretrained(str(other))
    differs = same_vocabulary(load_tokenizer(str(other)), tiny)
    assert "1 only in the teacher's" in differs and "<|extra_teacher_token|>" in differs
