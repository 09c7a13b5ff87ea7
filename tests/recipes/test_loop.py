"""The round loop in process, with stub stages in place of the real ones (no model loads, well under a second a
run): the order of the stages, what each is handed, the typed configs they get, skip on rerun, `round=N` extension."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from posttrain.config import (
    EvalJob,
    FilterConfig,
    GenerateJob,
    RewardConfig,
    RMConfig,
    SelectJob,
    SFTConfig,
    Source,
    TrainJob,
    register,
)
from posttrain.rundir import Stage, StageChanged, StageError, StageResult
from recipes import loop

# Each stage's outputs (name -> file written in its folder), as the real stages name them.
OUTPUTS = {
    "rm": ["model"], "generate": ["generations"], "score": ["scored"], "filter": ["kept", "removed"],
    "select": ["sft", "pairs"], "sft": ["model"], "dpo": ["model"], "eval": ["responses", "metrics"],
}
CONFIG_TYPES = {"rm": TrainJob, "generate": GenerateJob, "score": RewardConfig, "filter": FilterConfig,
                "select": SelectJob, "sft": TrainJob, "dpo": TrainJob, "eval": EvalJob}


class Recorder:
    """Stub stages that record every call (round from the folder name, stage, config, inputs) and write one small
    file per declared output, its text naming the stage and round so every output hashes differently."""

    def __init__(self):
        self.calls: list[tuple[int, str, object, dict]] = []

    def stage(self, name: str):
        def fn(cfg, inputs, out: Path) -> StageResult:
            r = int(out.parent.name.removeprefix("round_"))
            self.calls.append((r, name, cfg, inputs))
            for output in OUTPUTS[name]:
                (out / output).write_text(f"{name} round {r}")
            return StageResult(outputs={o: o for o in OUTPUTS[name]}, rows=1)
        return fn

    def table(self) -> list[Stage]:
        return [Stage(s.name, self.stage(s.name), s.resumable, s.module) for s in loop.STAGES]

    def called(self) -> list[tuple[int, str]]:
        return [(r, name) for r, name, _, _ in self.calls]

    def call(self, r: int, name: str) -> tuple[object, dict]:
        (found,) = [(cfg, inputs) for rr, n, cfg, inputs in self.calls if (rr, n) == (r, name)]
        return found


@pytest.fixture(autouse=True)
def no_report(monkeypatch):
    """The stubs write no real eval answers: the report has nothing to draw."""
    monkeypatch.setattr(loop, "build_report", lambda root: None)
    monkeypatch.setattr(loop, "terminal_table", lambda root: "")


def recipe(*overrides):
    register()
    with initialize_config_module(config_module="recipes", version_base="1.3"):
        # Self-training with a reward model from round 2 on, so every kind of hand-over happens.
        return compose("config", overrides=["experiment=tiny", "generate.source=policy", "rm.enabled=true",
                                            "evals.teacher=false", "+evals.suites.win_rate.against=[previous]",
                                            *overrides])


ROUND = ["generate", "score", "filter", "select", "sft", "dpo", "eval"]


def test_stages_run_in_order_with_their_inputs_handed_on(tmp_path):
    rec = Recorder()
    rd = loop.run(recipe("round=2"), run_dir=str(tmp_path), stages=rec.table())
    assert rec.called() == [(0, "eval"), *[(1, s) for s in ROUND], (2, "rm"), *[(2, s) for s in ROUND]]
    folder = {(r, s): str(tmp_path / f"round_{r}" / f"{i:02d}_{s}") for r in (0, 1, 2)
              for i, s in enumerate(OUTPUTS)}

    for _, name, cfg, _ in rec.calls:  # each stage gets its typed config, never a dict of the recipe
        assert isinstance(cfg, CONFIG_TYPES[name]), (name, type(cfg))
    gen1, gen1_in = rec.call(1, "generate")
    assert gen1.round == 1 and gen1.generate.source == Source.policy and gen1.prompt_start == 0
    assert gen1_in["model"] == "tiny://layers=2,hidden=64,seed=0"  # round 1 samples the starting policy
    assert rec.call(1, "score")[1] == {"generations": f"{folder[1, 'generate']}/generations"}
    assert rec.call(1, "filter")[1] == {"scored": f"{folder[1, 'score']}/scored", "previous_sft": []}
    assert rec.call(1, "select")[1] == {"scored": f"{folder[1, 'filter']}/kept"}
    sft1, sft1_in = rec.call(1, "sft")
    assert isinstance(sft1.train, SFTConfig) and sft1.train.learning_rate == 3e-3 and sft1.seed == 0
    assert sft1_in == {"model": "tiny://layers=2,hidden=64,seed=0", "data": [f"{folder[1, 'select']}/sft"]}
    assert rec.call(1, "dpo")[1] == {"model": f"{folder[1, 'sft']}/model", "data": [f"{folder[1, 'select']}/pairs"]}
    assert rec.call(1, "eval")[1]["policy"] == f"{folder[1, 'dpo']}/model"
    assert rec.call(1, "eval")[1]["previous"] == f"{folder[0, 'eval']}/responses"

    # Round 2: the RM trains on round 1's pairs and joins the rewards; the policy is round 1's DPO model; SFT
    # accumulates both rounds' data; the filter knows round 1's SFT answers.
    rm2, rm2_in = rec.call(2, "rm")
    assert isinstance(rm2.train, RMConfig) and rm2_in["data"] == [f"{folder[1, 'select']}/pairs"]
    score2, score2_in = rec.call(2, "score")
    assert "rm" in score2.rewards and score2_in["rm"] == f"{folder[2, 'rm']}/model"
    assert rec.call(2, "generate")[0].prompt_start == 32 and rec.call(2, "generate")[1]["model"] == \
        f"{folder[1, 'dpo']}/model"
    assert rec.call(2, "filter")[1]["previous_sft"] == [f"{folder[1, 'select']}/sft"]
    assert rec.call(2, "sft")[1]["data"] == [f"{folder[1, 'select']}/sft", f"{folder[2, 'select']}/sft"]
    eval2, eval2_in = rec.call(2, "eval")  # the eval is judged by this round's reward model too
    assert eval2_in["rm"] == f"{folder[2, 'rm']}/model" and "rm" in eval2.evals.rewards
    assert "rm" not in rec.call(1, "eval")[1] and eval2.training_prompts[0].endswith("tiny.jsonl")
    assert [(e["round"], e["stage"]) for e in rd.manifest["stages"]] == rec.called()


def test_rerun_skips_and_round_n_extends(tmp_path):
    loop.run(recipe("round=1"), run_dir=str(tmp_path), stages=Recorder().table())
    again = Recorder()
    loop.run(recipe("round=1"), run_dir=str(tmp_path), stages=again.table())
    assert again.called() == []  # everything finished: nothing runs

    more = Recorder()
    loop.run(recipe("round=2"), run_dir=str(tmp_path), stages=more.table())
    assert more.called() == [(2, "rm"), *[(2, s) for s in ROUND]]  # only the new round
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["stage"] for e in manifest["stages"] if e["round"] == 1] == ROUND


def test_a_changed_setting_stops_at_the_stage_it_changes(tmp_path):
    loop.run(recipe("round=1"), run_dir=str(tmp_path), stages=Recorder().table())
    rec = Recorder()
    with pytest.raises(StageChanged, match=r"round_1/sft .*config keys train.learning_rate"):
        loop.run(recipe("round=1", "sft.learning_rate=1e-4"), run_dir=str(tmp_path), stages=rec.table())
    assert rec.called() == []  # the stages before it were skipped, the changed one did not run
    # How the stage runs is not what it computes: other launch settings do not redo a finished stage.
    loop.run(recipe("round=1", "launch.nproc=2", "launch.launcher=torchrun"), run_dir=str(tmp_path),
             stages=rec.table())
    assert rec.called() == []


def test_where_the_trained_rm_scores_is_out_of_every_stage_hash():
    """rm.scorer's placement (device_map) changes no hash; its other arguments change the score stage's only, never
    the reward model's training."""
    from posttrain.config import ScoreJob, register, round_config, section
    from posttrain.rundir import config_hash_of, plain

    register()

    def hashes(*overrides):
        with initialize_config_module(config_module="recipes", version_base="1.3"):
            rc = round_config(compose("config", overrides=["experiment=tiny", "rm.enabled=true", *overrides]), 1)
        reward = section(rc, "reward")
        reward.rewards["rm"] = {"_target_": "reward.rm_scorer.RewardModelScorer", **section(rc, "rm").scorer}
        return (config_hash_of(plain(loop._train_job(rc, "rm"))), config_hash_of(plain(ScoreJob(**vars(reward)))))

    base = hashes()
    assert hashes("+rm.scorer.device_map=auto") == base
    rm, scored = hashes("+rm.scorer.dtype=bfloat16")
    assert rm == base[0] and scored != base[1]


@pytest.mark.parametrize("overrides, handed", [
    (["sft.lora.enabled=true"], True),                            # a LoRA SFT, then this round's DPO
    ([], False),                                                  # full weights: nothing to hand over
    (["sft.lora.enabled=true", "dpo.enabled=false"], False),      # the SFT model is the round's policy
    (["sft.lora.enabled=true", "sft.seeds=[1,2]"], False),        # seeds are averaged as full models
    (["sft.lora.enabled=true", "launch=torchrun_zero3"], True),   # ZeRO-3 too: merged on the partitions
])
def test_an_sft_adapter_is_handed_over_only_to_the_dpo_after_it(tmp_path, overrides, handed):
    rec = Recorder()
    loop.run(recipe("round=1", *overrides), run_dir=str(tmp_path), stages=rec.table())
    assert rec.call(1, "sft")[0].adapter_only is handed
    assert all(not cfg.adapter_only for _, name, cfg, _ in rec.calls if name in ("dpo", "rm"))


def test_the_report_is_built_once_at_the_end_and_after_a_failure(tmp_path, monkeypatch):
    """Plotting takes seconds: within `Reports.every` of the last build an eval only marks the report stale; the
    end of the invocation builds it, a failed one too; past `every`, each eval builds it."""
    built = []
    monkeypatch.setattr(loop, "build_report", lambda root: built.append(root))
    loop.run(recipe("round=2"), run_dir=str(tmp_path / "a"), stages=Recorder().table())
    assert built == [tmp_path / "a"]

    built.clear()
    rec = Recorder()
    table = rec.table()
    failing = [Stage(s.name, _raise, s.resumable, s.module) if s.name == "sft" else s for s in table]
    with pytest.raises(StageError, match="sft broke"):
        loop.run(recipe("round=2"), run_dir=str(tmp_path / "b"), stages=failing)
    assert built == [tmp_path / "b"] and rec.called()[0] == (0, "eval")

    built.clear()
    monkeypatch.setattr(loop.Reports.__init__, "__defaults__", (0.0,))  # every eval is past `every`
    loop.run(recipe("round=2"), run_dir=str(tmp_path / "c"), stages=Recorder().table())
    assert built == [tmp_path / "c"] * 3  # rounds 0, 1, 2


def _raise(cfg, inputs, out):
    raise RuntimeError("sft broke")


def test_an_sft_adapter_left_without_its_dpo_is_trained_again_whole(tmp_path):
    """A run whose LoRA SFT handed its adapter to DPO, resumed with DPO switched off (as the "no DPO pairs" error
    suggests): the round's policy must be a whole model, so the SFT stage runs again (the adapter folder is kept
    under superseded/), and the evaluation gets the merged model."""
    rec = Recorder()

    def sft(cfg, inputs, out: Path) -> StageResult:
        rec.calls.append((1, "sft", cfg, inputs))
        (out / "model").mkdir()
        (out / "model" / ("adapter_config.json" if cfg.adapter_only else "config.json")).write_text(
            '{"base_model_name_or_path": "tiny://layers=2,hidden=64,seed=0"}')
        return StageResult(outputs={"model": "model"}, rows=1)

    table = [Stage(s.name, sft, s.resumable, s.module) if s.name == "sft" else s for s in rec.table()]
    loop.run(recipe("round=1", "sft.lora.enabled=true"), run_dir=str(tmp_path), stages=table)
    assert (tmp_path / "round_1" / "05_sft" / "model" / "adapter_config.json").exists()
    with pytest.raises(StageChanged):  # a changed setting besides is the user's call, as for any finished stage
        loop.run(recipe("round=1", "sft.lora.enabled=true", "dpo.enabled=false", "sft.learning_rate=1e-4"),
                 run_dir=str(tmp_path), stages=table)
    rec.calls.clear()
    loop.run(recipe("round=1", "sft.lora.enabled=true", "dpo.enabled=false"), run_dir=str(tmp_path), stages=table)
    assert ("sft" in [name for _, name, _, _ in rec.calls]) and not rec.call(1, "sft")[0].adapter_only
    assert (tmp_path / "round_1" / "05_sft" / "model" / "config.json").exists()
    assert list((tmp_path / "round_1" / "superseded").glob("*sft*/model/adapter_config.json"))
    assert rec.call(1, "eval")[1]["policy"] == str(tmp_path / "round_1" / "05_sft" / "model")


def test_the_policy_an_eval_answered_with_is_kept_for_the_next_generate_only(tmp_path):
    """posttrain.models.keeping_models in the loop: what round N's eval keeps reaches round N + 1's generate and no
    stage after it; nothing is kept once the run returns."""
    from posttrain import models
    from posttrain.rundir import Stage

    rec, seen = Recorder(), []

    class Policy:  # stands for the eval backend's model
        pass

    def stage(name):
        recorded = rec.stage(name)

        def fn(cfg, inputs, out):
            seen.append((name, bool(models._KEPT)))
            if name == "eval":
                policy = Policy()
                models._KEYS[policy] = f"policy of {inputs['policy']}"
                models.keep_model(policy)
            return recorded(cfg, inputs, out)
        return fn

    table = [Stage(s.name, stage(s.name), s.resumable, s.module) for s in loop.STAGES]
    loop.run(recipe("round=2", "rm.enabled=false"), run_dir=str(tmp_path), stages=table)
    after_eval = [("generate", True)] + [(name, False) for name in ROUND[1:]]
    assert seen == [("eval", False)] + after_eval * 2
    assert models._KEPT is None
