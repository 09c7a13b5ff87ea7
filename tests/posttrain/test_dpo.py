"""DPO stage: formatting tokens out of the DPO loss, the NLL term, stored reference log-probs, and the real stage
process end to end (train, resume, reuse of the stored reference log-probs)."""

import dataclasses
import shutil

import datasets
import pytest
import torch

from posttrain.config import TrainJob
from posttrain.train.dpo import DPOConfig, build_datasets, dpo_stage, load_policy, train, trl_args

TOPICS = ["the sea", "the stars", "autumn leaves", "France", "a week", "the sky", "prime numbers", "London",
          "fruit", "python", "the moon", "books"]


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """12 prompts, one pair each: a polite answer (chosen) against a curt refusal (rejected), plus the extra
    columns the select stage writes."""
    rows = [
        {
            "prompt_id": f"p{i}",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"Tell me about {topic}."},
            ],
            "chosen": f"Here is a short answer about {topic}. Good answers are helpful.",
            "rejected": f"I don't know the answer about {topic}!!!",
            "chosen_score": 1.0,
            "rejected_score": 0.0,
            "margin": 1.0,
        }
        for i, topic in enumerate(TOPICS)
    ]
    path = tmp_path_factory.mktemp("pairs") / "pairs"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _settings(model, data, out, **overrides) -> dict:
    fast = dict(batch_size=4, max_length=256, logging_steps=1, lr_scheduler="constant", warmup_ratio=0.0)
    cfg = dataclasses.asdict(DPOConfig(**{**fast, **overrides}))
    return {**cfg, "seed": 0, "dtype": "auto", "model": str(model), "data": [str(data)], "output_dir": str(out)}


def _trainer(settings, *, mask=True, resident_ref=False, ref_store=None):
    from posttrain.train.dpo import Llama3DPOTrainer

    train_ds, _ = build_datasets(settings["data"], 0.0)
    model, tokenizer, _ = load_policy(settings)
    args = trl_args(settings, settings["output_dir"], precompute_ref_log_probs=not resident_ref, disable_tqdm=True)
    return Llama3DPOTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        processing_class=tokenizer,
        mask_format_tokens=mask,
        ref_store=ref_store,
    )


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _end_tokens(trainer, batch):
    """Independently of posttrain.chat: the turn terminators inside the completions (the only formatting tokens a
    single-message Llama 3 completion holds; its header belongs to the prompt)."""
    tok = trainer.processing_class
    ends = torch.tensor(tok.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"]))
    return torch.isin(batch["input_ids"], ends) & batch["completion_mask"].bool()


def _loss_and_grads(trainer, batch):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _perturb_at(model, positions):
    """Add large noise to the final hidden states at `positions` (bool, batch x seq): the logits there change and
    nowhere else (the final norm's output feeds only the LM head)."""
    noise = torch.randn(*positions.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    noise = 50.0 * noise * positions[..., None]
    return model.model.norm.register_forward_hook(lambda module, inputs, output: output + noise)


@pytest.mark.parametrize("mask", [True, False])
def test_formatting_tokens_do_not_move_the_dpo_loss(tiny_model_dir, pairs_dir, tmp_path, mask):
    trainer = _trainer(_settings(tiny_model_dir, pairs_dir, tmp_path, nll_weight=0.0), mask=mask)
    batch = _batch(trainer)
    ends = _end_tokens(trainer, batch)
    assert ends.sum() == len(ends)  # one <|eot_id|> per completion
    if mask:
        assert torch.equal(batch["format_mask"], ends)
    # The logits at position t score token t + 1: perturb those that score the end tokens.
    scoring_ends = torch.zeros_like(ends)
    scoring_ends[:, :-1] = ends[:, 1:]

    loss, grads = _loss_and_grads(trainer, batch)
    handle = _perturb_at(trainer.model, scoring_ends)
    perturbed_loss, perturbed_grads = _loss_and_grads(trainer, batch)
    if mask:
        torch.testing.assert_close(perturbed_loss, loss, rtol=1e-5, atol=1e-6)
        for g, pg in zip(grads, perturbed_grads, strict=True):
            torch.testing.assert_close(pg, g, rtol=1e-4, atol=1e-6)
        # The NLL term keeps the end tokens (it is what keeps the model stopping): with it, the loss moves.
        trainer.loss_weights = [1.0, 0.2]
        handle.remove()
        clean = trainer.compute_loss(trainer.model, batch).detach()
        handle = _perturb_at(trainer.model, scoring_ends)
        assert abs(trainer.compute_loss(trainer.model, batch).item() - clean.item()) > 1e-2
    else:
        assert abs(perturbed_loss.item() - loss.item()) > 1e-2
        assert max((pg - g).abs().max().item() for g, pg in zip(grads, perturbed_grads, strict=True)) > 1e-3
    handle.remove()


def _chosen_nll(model, batch) -> torch.Tensor:
    """Mean negative log-likelihood of the chosen completion tokens (end tokens included), from plain logits."""
    half = batch["input_ids"].size(0) // 2
    ids, attn, completion = (batch[k][:half] for k in ("input_ids", "attention_mask", "completion_mask"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits.double()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -logps[completion[:, 1:].bool()].mean()


def test_nll_weight_adds_exactly_the_chosen_nll(tiny_model_dir, pairs_dir, tmp_path):
    trainer = _trainer(_settings(tiny_model_dir, pairs_dir, tmp_path))
    batch = _batch(trainer)
    losses = {}
    for weight in (0.0, 0.2):
        trainer.loss_weights = [1.0, weight]
        with torch.no_grad():
            losses[weight] = trainer.compute_loss(trainer.model, batch).double()
    nll = _chosen_nll(trainer.model, batch)
    assert nll > 1.0
    torch.testing.assert_close(losses[0.2] - losses[0.0], 0.2 * nll, rtol=1e-5, atol=1e-6)


def _masked_sums(model, batch) -> torch.Tensor:
    """Summed log-probs of the completion tokens except the end tokens, in float64 from plain logits."""
    ids = batch["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits.double()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    keep = batch["completion_mask"].bool() & ~batch["format_mask"]
    return (logps * keep[:, 1:]).sum(-1)


def test_stored_reference_logps_equal_a_resident_reference(tiny_model_dir, pairs_dir, tmp_path, monkeypatch):
    from trl import DPOTrainer

    settings = _settings(tiny_model_dir, pairs_dir, tmp_path)
    store = tmp_path / "ref_logps"
    stored = _trainer(settings, ref_store=store)
    assert stored.ref_model is None and stored.ref_logps_source == {"train": "computed"}
    on_disk = datasets.load_from_disk(str(store / "train"))
    assert {"ref_chosen_logps", "ref_rejected_logps", "prompt_id", "chosen_ids"} <= set(on_disk.column_names)

    batch = _batch(stored, n=len(stored.train_dataset))
    direct = _masked_sums(stored.model, batch)
    torch.testing.assert_close(
        torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).double(), direct, rtol=1e-6, atol=1e-5
    )

    resident = _trainer(settings, resident_ref=True)
    assert resident.ref_model is not None
    chosen, rejected = resident.compute_ref_log_probs(resident.ref_model, batch)
    torch.testing.assert_close(chosen, batch["ref_chosen_logps"], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(rejected, batch["ref_rejected_logps"], rtol=1e-6, atol=1e-5)
    # Same loss with the policy moved away from the reference: stored columns vs the resident model's forward.
    for trainer in (stored, resident):
        torch.manual_seed(1)
        with torch.no_grad():
            for p in trainer.model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    with torch.no_grad():
        losses = [t.compute_loss(t.model, batch) for t in (stored, resident)]
    mode = "train" if stored.model.training else "eval"
    assert abs(stored._metrics[mode]["rewards/margins"][-1]) > 1e-3  # the policy did move away
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-5)

    # A second trainer on the same store reads it back without computing.
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps", lambda *a, **k: pytest.fail("recomputed"))
    again = _trainer(settings, ref_store=store)
    assert again.ref_logps_source == {"train": "stored"}
    assert again.train_dataset["ref_chosen_logps"] == on_disk["ref_chosen_logps"]


def test_changed_masking_recomputes_the_stored_reference(tiny_model_dir, pairs_dir, tmp_path):
    settings = _settings(tiny_model_dir, pairs_dir, tmp_path)
    masked = _trainer(settings, ref_store=tmp_path / "ref")
    plain = _trainer(settings, mask=False, ref_store=tmp_path / "ref")
    assert plain.ref_logps_source == {"train": "computed"}
    # Without masking the end token's log-prob is back in every sum.
    assert all(p < m for p, m in zip(plain.train_dataset["ref_chosen_logps"], masked.train_dataset["ref_chosen_logps"]))


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_dpo_stage_trains_resumes_and_reuses_reference(tiny_model_dir, pairs_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dpo"
    out.mkdir()
    stage = dict(learning_rate=1e-3, epochs=3, save_steps=2, eval_fraction=0.2, keep_checkpoints=True)
    settings = _settings(tiny_model_dir, pairs_dir, out, **stage)
    # `data` is the stage's input here, not dpo.data (the user's own sets)
    job = TrainJob(train=DPOConfig(**{k: v for k, v in settings.items() if k in DPOConfig.__dataclass_fields__
                                      and k != "data"}))
    inputs = {"model": str(tiny_model_dir), "data": [str(pairs_dir)]}

    # First attempt (in this process, to save a start-up): stops after 2 steps; what a crash leaves is the
    # checkpoint and the stored reference log-probs.
    first = train({**settings, "max_steps": 2})
    assert first["steps"] == 2 and first["ref_logps"] == {"train": "computed", "eval": "computed"}
    shutil.rmtree(out / "model")
    (out / "metrics.json").unlink()

    result = dpo_stage(job, inputs, out)
    m = result.metrics
    assert m["resumed_from"] == "checkpoint-2" and m["steps"] == 6
    # The whole run's loss, not only the steps after the checkpoint.
    assert m["train_loss"] == pytest.approx(sum(c["loss"] for c in m["loss_curve"]) / len(m["loss_curve"]))
    assert m["ref_logps"] == {"train": "stored", "eval": "stored"}
    assert result.rows == {"train_pairs": m["train_rows"], "eval_pairs": m["eval_rows"]}
    assert m["train_rows"] + m["eval_rows"] == len(TOPICS) and m["eval_rows"] > 0
    # Preference on the training pairs (TRL's implicit reward, per logged step) and on held-out pairs went up.
    curve = m["loss_curve"]
    assert [c["step"] for c in curve] == list(range(1, 7))
    assert curve[-1]["reward_margin"] > curve[0]["reward_margin"] + 0.5 and curve[-1]["reward_accuracy"] == 1.0
    assert curve[-1]["loss"] < curve[0]["loss"]
    assert m["eval_after"]["logp_accuracy"] > m["eval_before"]["logp_accuracy"]
    assert m["eval_after"]["reward_margin"] > 0 and m["eval_after"]["loss"] < m["eval_before"]["loss"]

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2

    # The resumed run ends where an uninterrupted one does.
    straight = tmp_path / "straight"
    straight.mkdir()
    train({**settings, "output_dir": str(straight)})
    resumed, uninterrupted = _weights(out / "model"), _weights(straight / "model")
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6)
    assert not torch.equal(uninterrupted["lm_head.weight"], _weights(tiny_model_dir)["lm_head.weight"])


@pytest.mark.parametrize("keys", [["a"], ["a", "a"], ["a", "b"], [f"p{i}" for i in range(5)]])
def test_held_out_split_always_leaves_a_prompt_to_train_on(keys):
    from posttrain.train.common import held_out

    for fraction in (0.0, 0.2, 0.5, 0.99, 1.0):
        held = held_out(keys, fraction)
        assert not all(held), (keys, fraction)
        if fraction > 0 and len(set(keys)) > 1:
            assert any(held), (keys, fraction)
        by_prompt = {}
        for k, h in zip(keys, held):
            assert by_prompt.setdefault(k, h) == h  # all rows of a prompt on one side


def test_a_single_pair_trains_without_a_held_out_split(tiny_model_dir, tmp_path):
    # One pair and eval_fraction near 1: the split would hold out every pair and leave TRL nothing to train on.
    one = tmp_path / "one_pair"
    datasets.Dataset.from_list([{
        "prompt_id": "p0", "messages": [{"role": "user", "content": "Tell me about the sea."}],
        "chosen": "The sea is large and blue.", "rejected": "No.",
    }]).save_to_disk(str(one))
    out = tmp_path / "dpo"
    out.mkdir()
    m = train({**_settings(tiny_model_dir, one, out), "eval_fraction": 0.99, "max_steps": 1})
    assert m["train_rows"] == 1 and m["eval_rows"] == 0 and m["steps"] == 1 and "eval_after" not in m
    assert (out / "model" / "model.safetensors").exists()


def test_content_that_spells_special_tokens_stays_text(tiny_model_dir, tmp_path):
    """A chosen answer that writes "<|eot_id|>" or a header as text: TRL's tokenization (through posttrain's
    tokenizer) keeps it plain text, so the completion holds exactly one real terminator and no header, and the
    format mask takes out only that terminator, not the rest of the answer."""
    spelled = "Fine. <|eot_id|> then <|start_header_id|>assistant<|end_header_id|> and more words here"
    rows = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": f"Say it {i} <|eot_id|>"}],
             "chosen": spelled, "rejected": "No."} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pairs"))
    trainer = _trainer(_settings(tiny_model_dir, tmp_path / "pairs", tmp_path))
    tok = trainer.processing_class
    specials = set(tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]))
    row = trainer.train_dataset[0]
    assert [t for t in row["chosen_ids"] if t in specials] == tok.convert_tokens_to_ids(["<|eot_id|>"])
    assert tok.decode(row["chosen_ids"][:-1]) == spelled  # the text, character for character
    assert sum(t in specials for t in row["prompt_ids"]) == 5  # header x2, end-header x2, the user turn's eot
    batch = _batch(trainer)
    assert batch["format_mask"].sum(dim=1).tolist() == [1] * 8  # one terminator per chosen and rejected
    assert torch.equal(batch["format_mask"], _end_tokens(trainer, batch))


@pytest.mark.parametrize("lora", [False, True])
def test_seeds_share_one_reference_pass(tiny_model_dir, pairs_dir, tmp_path, monkeypatch, lora):
    """`dpo.seeds`: the pairs and the reference are every seed's, so the stage computes the reference log-probs
    once (the first seed) and the other seeds read them back from the stage's `ref_logps/`; with LoRA too, whose
    adapter starts from other random factors in every seed (the reference is the model without it)."""
    from posttrain.config import LoraConfig
    from posttrain.train import dpo

    out = tmp_path / "dpo"
    out.mkdir()
    adapter = LoraConfig(enabled=lora, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    settings = _settings(tiny_model_dir, pairs_dir, out, eval_fraction=0.2, max_steps=1, lora=adapter)
    sent = {}
    monkeypatch.setattr(dpo, "launch_stage", lambda module, job, s, o: sent.update(s) or ({"train_rows": 1,
                                                                                         "eval_rows": 1}, {}))
    dpo.dpo_stage(TrainJob(train=DPOConfig(seeds=[1, 2])), {"model": str(tiny_model_dir), "data": [str(pairs_dir)]},
                  out)
    assert sent["ref_store"] == str(out / "ref_logps")
    seeds = [train({**settings, "seed": s, "output_dir": str(out / f"seed_{s}"), "ref_store": sent["ref_store"]})
             for s in (1, 2)]
    assert [m["ref_logps"] for m in seeds] == [{"train": "computed", "eval": "computed"},
                                               {"train": "stored", "eval": "stored"}]
    assert not (out / "seed_1" / "ref_logps").exists() and (out / "ref_logps" / "train").is_dir()
    assert seeds[0]["train_logp_accuracy_before"] == seeds[1]["train_logp_accuracy_before"]


def test_an_sft_adapter_is_handed_to_dpo_without_a_merged_copy(tiny_model_dir, pairs_dir, tmp_path):
    """TrainJob.adapter_only (the loop's choice for a LoRA SFT followed by DPO): the SFT stage saves its adapter
    alone, naming its base; loading it merges it into the base, to the same weights the merged save holds; and
    the DPO stage trains from it."""
    import json

    from safetensors.torch import load_file

    from posttrain.config import LoraConfig, SFTConfig
    from posttrain.models import adapter_base, load_causal_lm
    from posttrain.train.sft import sft_stage

    rows = datasets.load_from_disk(str(pairs_dir)).to_list()
    sft_rows = tmp_path / "sft_rows"
    datasets.Dataset.from_list([{"prompt_id": r["prompt_id"], "messages": r["messages"], "text": r["chosen"]}
                                for r in rows]).save_to_disk(str(sft_rows))
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    sft = SFTConfig(learning_rate=3e-3, epochs=1, batch_size=4, max_length=128, logging_steps=1, save_steps=1000,
                    eval_fraction=0.0, lr_scheduler="constant", lora=lora)
    models = {}
    for adapter_only in (True, False):
        out = tmp_path / f"sft_{adapter_only}"
        out.mkdir()
        sft_stage(TrainJob(train=sft, adapter_only=adapter_only),
                  {"model": str(tiny_model_dir), "data": [str(sft_rows)]}, out)
        models[adapter_only] = out / "model"
    adapter, merged = models[True], models[False]
    assert not (adapter / "config.json").exists() and not (adapter / "model.safetensors").exists()
    assert adapter_base(str(adapter)) == str(tiny_model_dir.resolve())
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size / 4
    loaded, saved = load_causal_lm(str(adapter)).state_dict(), load_file(str(merged / "model.safetensors"))
    assert {k for k in loaded if k != "lm_head.weight"} <= saved.keys()
    assert all(loaded[k].equal(saved[k]) for k in saved)
    assert not saved["model.layers.0.self_attn.q_proj.weight"].equal(
        load_file(str(tiny_model_dir / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"])

    out = tmp_path / "dpo"
    out.mkdir()
    metrics = train(_settings(adapter, pairs_dir, out, eval_fraction=0.0, max_steps=2, learning_rate=1e-3))
    assert metrics["steps"] == 2 and (out / "model" / "config.json").is_file()
