"""Tests for recipes.validate on the real recipes, composed with Hydra and shrunk by overrides (no models load)."""

import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from posttrain.config import register
from posttrain.errors import PosttrainError
from recipes.validate import ALLOWED_PREFIXES, check_target, validate

register()


def recipe(*overrides):
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def problems(*overrides, cfg=None) -> str:
    """The message validate() raises for the recipe with these overrides."""
    with pytest.raises(PosttrainError) as err:
        validate(cfg if cfg is not None else recipe(*overrides))
    return str(err.value)


@pytest.mark.parametrize("overrides", [[], ["experiment=tiny"], ["experiment=tiny", "round=3"]])
def test_shipped_recipes_validate(overrides):
    cfg = recipe(*overrides)
    rounds = validate(cfg)
    assert len(rounds) == cfg.round
    assert rounds[0].generate.backend._target_ == "data_gen.hf_backend.HFBackend"


def test_experiment_tiny_applies():
    cfg = recipe("experiment=tiny")
    assert (cfg.name, cfg.generate.k, cfg.sft.learning_rate) == ("tiny", 2, 3.0e-3)


@pytest.mark.parametrize("override", ["model.pathh=x", "generate.tempreature=0.5", "sft.lora.rr=4"])
def test_unknown_key_fails_at_compose(override):
    key = override.split("=")[0].split(".")[-1]
    with pytest.raises((HydraException, OmegaConfBaseException), match=key):
        recipe(override)


def test_unknown_key_in_a_recipe_file_fails_at_compose():
    ConfigStore.instance().store(
        group="experiment", name="typo_for_test", node={"generate": {"tempreature": 0.5}}, package="_global_"
    )
    with pytest.raises(HydraException, match="tempreature"):
        recipe("experiment=typo_for_test")


def test_unknown_key_added_with_plus_is_rejected():
    assert "tempreature" in problems("+generate.tempreature=0.5")


def test_target_not_on_allowlist():
    msg = problems("generate.backend._target_=os.system")
    assert "generate.backend._target_" in msg and "'os.system' is not allowed" in msg and "allowed_targets" in msg


def test_code_rewards_need_a_sandbox_or_an_explicit_opt_out(monkeypatch):
    import reward.sandbox

    code = ["+reward.rewards.code._target_=reward.sandbox.CodeExecution"]
    validate(recipe(*code))
    monkeypatch.setattr(reward.sandbox, "_isolation", lambda: (None, "bwrap cannot make a sandbox here (test)"))
    msg = problems(*code)
    assert "reward.rewards.code: model code cannot be sandboxed here: bwrap cannot make a sandbox here (test)" in msg
    assert "reward.rewards.code.allow_unsandboxed=true" in msg
    validate(recipe(*code, "+reward.rewards.code.allow_unsandboxed=true"))


def test_target_that_cannot_be_imported():
    msg = problems("generate.backend._target_=data_gen.no_such_module.Backend")
    assert "generate.backend._target_: cannot import 'data_gen.no_such_module.Backend'" in msg


def test_unknown_backend_argument():
    msg = problems("+generate.backend.bogus=1")
    assert "generate.backend: data_gen.hf_backend.HFBackend takes no argument(s) ['bogus']" in msg
    assert "'model'" not in msg  # posttrain passes `model` itself; the hint lists only what a recipe may set


def test_an_unknown_backend_dtype_is_refused_by_key():
    msg = problems("+generate.backend.dtype=fp8", "+evals.backend.dtype=bf16")
    assert "generate.backend.dtype: 'fp8' is not one of ['auto', 'float32', 'bfloat16', 'float16']" in msg
    assert "evals.backend.dtype: 'bf16' is not one of" in msg
    validate(recipe("+generate.backend.dtype=float32"))  # a known one passes


@pytest.fixture
def user_backend(tmp_path, monkeypatch):
    """A user's backend class in a module `mypkg` on sys.path."""
    (tmp_path / "mypkg.py").write_text(
        "class Backend:\n"
        "    def __init__(self, model, batch_size=1, beam=1):\n"
        "        pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mypkg.Backend"
    sys.modules.pop("mypkg", None)


def test_user_target_needs_allowed_targets(user_backend):
    assert "'mypkg.Backend' is not allowed" in problems(f"generate.backend._target_={user_backend}")
    validate(recipe(f"generate.backend._target_={user_backend}", "allowed_targets=[mypkg.]",
                    "+generate.backend.beam=4"))
    msg = problems(f"generate.backend._target_={user_backend}", "allowed_targets=[mypkg.]", "+generate.backend.bogus=4")
    assert "mypkg.Backend takes no argument(s) ['bogus'] (it takes ['batch_size', 'beam'])" in msg


def test_check_target_directly():
    ok = {"_target_": "data_gen.hf_backend.HFBackend", "batch_size": 2, "_partial_": True}
    assert check_target("generate.backend", ok, ALLOWED_PREFIXES) is None
    assert "not allowed" in check_target("x", {"_target_": 3}, ALLOWED_PREFIXES)
    assert "not allowed" in check_target("x", {"_target_": "posttrainx.Evil"}, ALLOWED_PREFIXES)


def test_allowlist_cannot_be_bypassed_through_an_allowed_module():
    problem = check_target("generate.backend", {"_target_": "posttrain.rundir.os.system"}, ALLOWED_PREFIXES)
    assert problem is not None and "not allowed" in problem


@pytest.mark.parametrize(
    "override, expected",
    [
        ("generate.k=0", "generate.k: must be > 0, got 0"),
        ("generate.top_p=1.5", "generate.top_p: must be in (0, 1], got 1.5"),
        ("generate.temperature=-1", "generate.temperature: must be >= 0"),
        ("sft.warmup_ratio=1.0", "sft.warmup_ratio: must be in [0, 1)"),
        ("dpo.warmup_ratio=1.0", "dpo.warmup_ratio: must be in [0, 1)"),
        ("rm.batch_size=0", "rm.batch_size: must be > 0"),
        ("dpo.grad_accum=0", "dpo.grad_accum: must be > 0"),
        ("launch.nproc=0", "launch.nproc: must be > 0"),
        ("launch.data.score_shard_rows=0", "launch.data.score_shard_rows: must be > 0"),
        ("+launch.data.nproc.scroe=2", "launch.data.nproc.scroe: not a data stage; the stages that run on several "
                                       "processes are ['generate', 'score', 'eval']"),
        ("+launch.data.nproc.score=0", "launch.data.nproc.score=0: must be a whole number of processes >= 1"),
        ("+rm.scorer.devicemap=auto", "rm.scorer: ['devicemap'] are not arguments of "
                                      "reward.rm_scorer.RewardModelScorer"),
    ],
)
def test_value_out_of_range(override, expected):
    assert expected in problems(override)


@pytest.mark.parametrize(
    "override, allowed",
    [
        ("generate.source=teachers", "[teacher, policy]"),
        ("data.on_empty=skip", "[error, quarantine]"),
        ("sft.init=last", "[base, policy]"),
        ("select.pairs=random", "[best_vs_worst, best_vs_random_lower]"),
        ("launch.launcher=mpirun", "[direct, torchrun, accelerate]"),
        ("model.dtype=fp8", "[auto, float32, bfloat16, float16]"),
    ],
)
def test_string_choices_are_enums_checked_while_composing(override, allowed):
    """A choice outside its Enum fails when Hydra composes the recipe, naming the key and the choices."""
    with pytest.raises(HydraException) as err:
        recipe(override)
    message = f"{err.value} {err.value.__cause__}"
    assert override in message and allowed in message, message


def test_round_zero():
    assert "round: must be >= 1" in problems("round=0")


def test_missing_prompts_file(tmp_path):
    missing = tmp_path / "missing.jsonl"
    msg = problems(f"data.prompts={missing}")
    assert "data.prompts" in msg and str(missing) in msg and "does not exist" in msg


def test_malformed_prompts_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
    msg = problems(f"data.prompts={bad}")
    assert "data.prompts" in msg and f"{bad}:2: invalid JSON" in msg


def test_prompts_from_missing_package():
    assert "data.prompts" in problems("data.prompts=pkg://no_such_pkg/prompts.jsonl")


def test_model_path_missing():
    msg = problems("model.path=/nonexistent")
    assert "model.path='/nonexistent'" in msg and "does not exist" in msg


def test_teacher_path_checked_only_when_used():
    # experiment=tiny: the teacher generates; with evals.teacher, round 0's eval answers with it
    assert "teacher.path='/nonexistent'" in problems("experiment=tiny", "teacher.path=/nonexistent")
    validate(recipe("teacher.path=/nonexistent"))  # the default recipe samples from its policy only
    assert "teacher.path='/nonexistent'" in problems("teacher.path=/nonexistent", "evals.teacher=true")
    validate(recipe("experiment=tiny", "teacher.path=/nonexistent", "generate.source=policy", "evals.teacher=false",
                    "+evals.suites.win_rate.against=[previous]"))
    validate(recipe("experiment=tiny", "teacher.path=/nonexistent", "generate.source=policy", "evals.heldout=null"))


def test_teacher_source_without_teacher():
    msg = problems("experiment=tiny", "~teacher")
    assert "generate.source: 'teacher' needs a `teacher` model" in msg
    validate(recipe("experiment=tiny", "~teacher", "generate.source=policy",
                    "+evals.suites.win_rate.against=[previous]"))


def test_misspelt_key_in_rounds():
    msg = problems("rounds=[{generate:{tempreature:0.5}}]")
    assert "rounds[0]" in msg and "tempreature" in msg

    cfg = recipe()  # the same, set after composition
    cfg.rounds = OmegaConf.create([{}, {"sft": {"learnin_rate": 1}}])
    cfg.round = 2
    msg = problems(cfg=cfg)
    assert "rounds[1]" in msg and "learnin_rate" in msg


def test_rounds_are_validated_per_round():
    msg = problems("experiment=tiny", "round=3", "rounds=[{},{generate:{k:0}}]")
    assert "round 2: generate.k: must be > 0" in msg and "round 1:" not in msg and "round 3:" not in msg
    rounds = validate(recipe("experiment=tiny", "round=2", "rounds=[{generate:{k:4}}]"))
    assert [rc.generate.k for rc in rounds] == [4, 2]  # rounds past the list use the recipe as it is


def test_all_problems_reported_together(tmp_path):
    msg = problems("experiment=tiny", "dpo.enabled=false", "generate.k=0", "generate.top_p=1.5",
                   "model.path=/nonexistent",
                   f"data.prompts={tmp_path / 'missing.jsonl'}", "generate.backend._target_=os.system")
    lines = [line for line in msg.splitlines() if line.startswith("  - ")]
    assert msg.startswith("invalid recipe:") and len(lines) == 5
    for key in ("generate.k", "generate.top_p", "model.path", "data.prompts", "generate.backend._target_"):
        assert any(key in line for line in lines), key


@pytest.mark.parametrize("override, expected", [
    # An escaped interpolation is text after resolution; instantiate would resolve it again and build shutil.copyfile.
    (r"""+generate.backend.dtype='\${oc.create:"{_target_: shutil.copyfile, src: a, dst: b}"}'""",
     "generate.backend.dtype: '${oc.create:"),
    ("reward.rewards.brevity._target_=reward.sandbox._remove", "'reward.sandbox._remove' is private"),
    ("reward.rewards.brevity._target_=posttrain.models._publish", "'posttrain.models._publish' is private"),
    ("allowed_targets=['']", "allowed_targets[0]: '' is not a module prefix"),
    ("allowed_targets=[os.]", "allowed_targets[0]: 'os.' would allow the standard library"),
    ("allowed_targets=[shutil]", "allowed_targets[0]: 'shutil' would allow the standard library"),
    ("allowed_targets=[builtins.]", "allowed_targets[0]: 'builtins.' would allow the standard library"),
    ("+generate.backend.base_url=http://user:hunter2@teacher:8000/v1",
     "generate.backend.base_url: a URL with credentials in it"),
])
def test_allowlist_refuses_what_hydra_would_run(override, expected):
    assert expected in problems("experiment=tiny", override)


def test_allowed_targets_of_your_own_package_pass():
    validate(recipe("experiment=tiny", "allowed_targets=[mypkg.]"))


def test_a_win_rate_with_no_reward_to_judge_is_refused():
    msg = problems("experiment=tiny", "~reward.rewards.brevity", "dpo.enabled=false")
    assert "evals.suites.win_rate: a win rate needs a reward to judge with" in msg


def test_a_prompt_longer_than_the_limit_stops_the_run_before_any_stage(tmp_path):
    long = tmp_path / "prompts.jsonl"
    long.write_text('{"id": "short", "prompt": "Hi."}\n' + '{"id": "huge", "prompt": "' + "word " * 40_000 + '"}\n')
    msg = problems("experiment=tiny", f"data.prompts={long}", "data.num_prompts=1", "dpo.enabled=false")
    assert "1 prompt(s) of" in msg and "['huge']" in msg and "longer than" in msg  # the model's context: 2048 - 24
    tight = problems("experiment=tiny", f"data.prompts={long}", "data.max_prompt_tokens=2", "data.num_prompts=1",
                     "dpo.enabled=false")
    assert "2 prompt(s) of" in tight and "['short', 'huge']" in tight and "longer than 2 tokens" in tight


def test_the_distillation_recipe_judges_and_evaluates_with_the_teachers_endpoint():
    from omegaconf import OmegaConf

    from posttrain.config import round_config
    from recipes.validate import teacher_backend
    from reward.protocol import build_reward

    rc = round_config(recipe("experiment=llama3_8b_distill_405b"), 1)
    assert teacher_backend(rc)["_target_"] == "data_gen.openai_backend.OpenAIBackend"  # no 405B loaded in process
    judge = build_reward(OmegaConf.to_container(rc.reward.rewards.judge, resolve=True))
    assert type(judge.backend).__name__ == "OpenAIBackend" and judge.backend.model == rc.teacher.path


def test_a_nested_backend_without_a_model_is_refused_by_key():
    judge = ["+reward.rewards.judge._target_=reward.judge.LLMJudge",
             "+reward.rewards.judge.backend._target_=data_gen.openai_backend.OpenAIBackend",
             "+reward.rewards.judge.backend.base_urls=[http://127.0.0.1:9/v1]"]
    msg = problems(*judge)
    assert "reward.rewards.judge.backend: data_gen.openai_backend.OpenAIBackend needs argument(s) ['model']" in msg
    validate(recipe(*judge, "+reward.rewards.judge.model=served-judge"))


def test_report_to_is_checked_before_any_stage(monkeypatch):
    import transformers.integrations.integration_utils as integrations

    msg = problems("sft.report_to=[tensorbord]")
    assert "sft.report_to: ['tensorbord'] not a tracker transformers knows" in msg and "'tensorboard'" in msg
    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: [])
    assert "dpo.report_to: ['wandb'] not installed here (pip install wandb)" in problems("dpo.report_to=[wandb]")
    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["wandb"])
    validate(recipe("dpo.report_to=[wandb]", "sft.report_to=[none]"))


@pytest.mark.parametrize("override, expected", [
    ("sft.optim=adamw_tourch", "sft.optim: must be a transformers optimizer name"),
    ("dpo.loss_type=ipoo", "dpo.loss_type: must be one of TRL's preference losses"),
    ("dpo.label_smoothing=0.7", "dpo.label_smoothing: must be in [0, 0.5)"),
    ("sft.attn_implementation=fastest", "sft.attn_implementation: must be one of"),
    ("rm.max_grad_norm=-1", "rm.max_grad_norm: must be >= 0"),
    ("evals.num_prompts=0", "evals.num_prompts: must be > 0"),
])
def test_training_knobs_are_checked_naming_the_key(override, expected):
    assert expected in problems("experiment=tiny", override)


def test_dpo_loss_names_are_trls_own():
    import re

    from trl import DPOConfig

    from recipes.validate import DPO_LOSSES

    doc = DPOConfig.__doc__.split("loss_type (", 1)[1].split("loss_weights", 1)[0]
    assert set(DPO_LOSSES) == set(re.findall(r"`'(\w+)'`", doc)) - {"sft"}  # sft: the NLL term posttrain adds


def test_a_pool_smaller_than_a_round_is_an_error_not_a_silent_cap():
    msg = problems("experiment=tiny", "data.num_prompts=500")
    assert "data.num_prompts=500 asks for more prompts than data.prompts: pkg://data_gen/prompts/tiny.jsonl" in msg
    assert "(96 usable)" in msg


def test_switching_backend_leaves_the_other_backends_settings_behind(capsys):
    switch = ["experiment=tiny", "generate.backend._target_=data_gen.openai_backend.OpenAIBackend",
              "+generate.backend.base_urls=[http://127.0.0.1:9/v1]", "+generate.backend.api_key_env=null"]
    rounds = validate(recipe(*switch))  # tiny's hf batch_size: 8 is not the endpoint's to take
    assert "batch_size" not in rounds[0].generate.backend and rounds[0].evals.backend.batch_size == 12
    assert "generate.backend.batch_size is a setting of HFBackend, not of OpenAIBackend: left out" in \
        capsys.readouterr().out
    msg = problems(*switch, "+generate.backend.batchsize=3")  # a key no backend takes is still an error
    assert "OpenAIBackend takes no argument(s) ['batchsize']" in msg


def test_a_required_key_left_unset_is_named():
    assert "model.path: required and not set (pass model.path=...)" in problems("experiment=tiny", "model.path=???")


def test_a_prompt_mix_that_changes_between_rounds_is_refused():
    from omegaconf import open_dict

    cfg = recipe("experiment=tiny", "round=2")
    tiny = "pkg://data_gen/prompts/tiny.jsonl"
    with open_dict(cfg):
        cfg.data.prompts = [tiny, {"path": "pkg://evals/data/ifeval_heldout.jsonl", "weight": 0.5}]
        cfg.rounds = [{}, {"data": {"prompts": [tiny]}}]
    assert "round 2: data.prompts mixes several sources and differs from round 1's" in problems(cfg=cfg)


KD = ["experiment=tiny", "generate.teacher_logprobs=20", "sft.kd.weight=0.5"]


def test_token_level_distillation_settings_agree():
    assert validate(recipe(*KD))[0].sft.kd.weight == 0.5  # tiny teacher and student share one tokenizer
    found = problems("experiment=tiny", "sft.kd.weight=0.5", "sft.packing=true", "sft.kd.temperature=0")
    assert "sft.kd.weight: 0.5 trains on the teacher's log-probs, which are not collected" in found
    assert "sft.kd: token-level distillation does not pack sequences" in found
    assert "sft.kd.temperature: must be > 0" in found
    assert "generate.teacher_logprobs: 20 collects a teacher's log-probs, but generate.source is 'policy'" in problems(
        *KD, "generate.source=policy")
    endpoint = ["generate.backend._target_=data_gen.openai_backend.OpenAIBackend",
                "+generate.backend.base_urls=http://127.0.0.1:9", "+generate.backend.api_key_env=null"]
    assert "generate.backend.tokenizer: generate.teacher_logprobs=20 from an endpoint needs a local tokenizer" in \
        problems(*KD, *endpoint)
    assert "generate.backend.prefix_sharing: the hf backend collects top-k log-probs in its decoding loop" in \
        problems(*KD, "+generate.backend.prefix_sharing=false")
    vllm = ["generate.backend._target_=data_gen.vllm_backend.VLLMBackend", "generate.teacher_logprobs=32"]
    assert "generate.backend.max_logprobs: vLLM's engine returns at most 20 log-probs" in problems(*KD, *vllm)


def test_a_teacher_with_another_vocabulary_is_refused_for_token_level_distillation(tmp_path):
    import shutil

    from posttrain.models import load_tokenizer, resolve_model

    teacher = tmp_path / "teacher"
    shutil.copytree(resolve_model("tiny://layers=2,hidden=64,seed=1,init_std=0.3"), teacher)
    tokenizer = load_tokenizer(str(teacher))
    tokenizer.add_tokens(["<|teacher_only|>"])
    tokenizer.save_pretrained(str(teacher))
    found = problems(*KD, f"teacher.path={teacher}")
    assert "teacher.path: generate.teacher_logprobs needs the teacher's vocabulary to be the student's" in found
    assert "1 only in the teacher's (e.g. '<|teacher_only|>')" in found and "sequence-level distillation" in found
    validate(recipe("experiment=tiny", f"teacher.path={teacher}"))  # sequence-level distillation is fine
