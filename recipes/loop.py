"""The round loop, read top to bottom like the paper's figure (Llama 3, section 4.1):

    [RM on all pairs so far] -> prompts -> generate (teacher or policy, K each) -> score (every reward)
        -> [filter: cleaning, dedup, quality] -> select (best-of-K for SFT, best vs worst for DPO)
        -> SFT (on every round's SFT data, from the base model) -> DPO (on this round's pairs) -> eval
        -> policy for the next round

`STAGES` is the one table of stages, in data-flow order (their folders are numbered by it); the run directory is
given it and runs each stage as `fn(typed config, inputs, out_dir) -> StageResult`, skipping what already finished
and resuming what did not. This module is the driver: it imports every package below it, and none imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from data_gen.generate import generate
from evals.report import build_report, terminal_table
from evals.stage import eval_stage
from evals.tracking import log_eval
from posttrain.config import EvalJob, GenerateJob, Init, ScoreJob, SelectJob, Source, TrainJob, round_config, section
from posttrain.models import adapter_base, keeping_models, release_models, resolve_path
from posttrain.rundir import RunDir, Stage, config_hash_of, redact, redact_override
from posttrain.sources import fingerprint_path, parse_sources
from posttrain.train import forkserver
from posttrain.train.dpo import dpo_stage
from posttrain.train.rm import rm_stage
from posttrain.train.sft import sft_stage
from recipes.validate import teacher_backend, training_prompts, validate
from reward.filters import filter_stage
from reward.score import score
from reward.select import select

STAGES = [
    Stage("rm", rm_stage, resumable=True, module="posttrain.train.rm"),
    Stage("generate", generate, resumable=True),
    Stage("score", score, resumable=True),  # finished shards survive a crash
    Stage("filter", filter_stage, resumable=True),  # finished filters' checkpoints survive a crash
    Stage("select", select),
    Stage("sft", sft_stage, resumable=True, module="posttrain.train.sft"),
    Stage("dpo", dpo_stage, resumable=True, module="posttrain.train.dpo"),
    Stage("eval", eval_stage, resumable=True),  # a paid teacher's journal in its partial folder survives
]

def _train_job(rc: DictConfig, key: str, adapter_only: bool = False) -> TrainJob:
    train = section(rc, key)
    if key == "rm":  # how the trained RM scores is the score stage's business, not part of training it
        train = dataclasses.replace(train, scorer={})
    return TrainJob(train=train, dtype=rc[key].dtype or rc.model.dtype, seed=rc.seed, launch=section(rc, "launch"),
                    adapter_only=adapter_only)


def _sources(rc: DictConfig, key: str, split: str = "train") -> list[str]:
    """The local paths (or hub ids) of the sources a recipe key names, for the run directory's fingerprints."""
    return [fingerprint_path(s) for s in parse_sources(OmegaConf.select(rc, key), key, split)]


def _with_user_data(inputs: dict, rc: DictConfig, key: str) -> dict:
    """A training stage's inputs plus `user_data` when the recipe gives `<key>.data` (sources name their split;
    default "train"): a recipe without it has no `user_data` input."""
    user = _sources(rc, f"{key}.data")
    return {**inputs, "user_data": user} if user else inputs


def _earlier(rd: RunDir, r: int, stage: str, output: str) -> list[str]:
    """Output `output` of stage `stage` in every round before `r` that has it, oldest first."""
    return [rd.output(e, output) for i in range(1, r) if (e := rd.entry(i, stage)) is not None]


def run_round(rd: RunDir, rc: DictConfig, r: int, policy: str, prompt_start: int) -> str:
    """Run round `r` with its config `rc`, starting from `policy` (a model spec or folder) and reading prompts
    from position `prompt_start` of the seeded prompt stream; returns the policy for the next round."""
    reward = section(rc, "reward")
    score_inputs = {}
    if rc.rm.enabled:  # on all preference pairs so far (Llama 3: the RM sees all of it, DPO the latest)
        data = _earlier(rd, r, "select", "pairs")
        if data or rc.rm.data:
            rm = rd.run_stage(r, "rm", _train_job(rc, "rm"),
                              _with_user_data({"model": rc.rm.model or rc.model.path, "data": data}, rc, "rm"))
            reward.rewards["rm"] = {"_target_": "reward.rm_scorer.RewardModelScorer", **section(rc, "rm").scorer}
            score_inputs["rm"] = rd.output(rm, "model")

    gen_model = rc.teacher.path if rc.generate.source == Source.teacher else policy
    job = GenerateJob(generate=section(rc, "generate"), data=section(rc, "data"), round=r, seed=rc.seed,
                      prompt_start=prompt_start, launch=section(rc, "launch"))
    prompts = _sources(rc, "data.prompts", rc.data.split)
    gen = rd.run_stage(r, "generate", job, {"prompts": prompts[0] if len(prompts) == 1 else prompts,
                                            "model": gen_model})
    release_models()  # the eval before it answered with this model; the stages after load their own
    sft_data, pairs = rd.output(gen, "generations"), None

    if reward.rewards:
        scored = rd.run_stage(r, "score", ScoreJob(**vars(reward), launch=section(rc, "launch")),
                              {"generations": sft_data, **score_inputs})
        candidates = rd.output(scored, "scored")
        if rc.filter.filters:
            # Earlier rounds' SFT data, so a response already trained on is not trained on again.
            filtered = rd.run_stage(r, "filter", section(rc, "filter"),
                                    {"scored": candidates, "previous_sft": _earlier(rd, r, "select", "sft")})
            candidates = rd.output(filtered, "kept")
        selected = rd.run_stage(r, "select", SelectJob(select=section(rc, "select"), seed=rc.seed),
                                {"scored": candidates})
        sft_data, pairs = rd.output(selected, "sft"), rd.output(selected, "pairs")

    dpo_follows = bool(rc.dpo.enabled and (pairs is not None or rc.dpo.data))
    if rc.sft.enabled:  # with the recipe's own SFT sets (sft.data) beside them
        data = [sft_data]
        if rc.sft.accumulate:  # SFT data of earlier rounds (Llama 3 trains each round on everything so far)
            data = [d for i in range(1, r) if (d := _sft_data(rd, i))] + data
        start = rc.model.path if rc.sft.init == Init.base else policy
        # A LoRA SFT whose only consumer is this round's DPO hands it its adapter, unmerged (TrainJob.adapter_only)
        handoff = dpo_follows and rc.sft.lora.enabled and not rc.sft.seeds
        job = _train_job(rc, "sft", adapter_only=handoff)
        finished = rd.entry(r, "sft")
        if finished is not None and not handoff and finished.get("config_hash") == config_hash_of(job) \
                and adapter_base(rd.output(finished, "model")) is not None:
            # Its adapter was for a DPO stage the recipe no longer runs after it: the round's policy must be whole.
            # (Other changed settings are still the user's call: the stage then stops as changed, as any would.)
            print(f"posttrain: round_{r}/sft saved its LoRA adapter alone for the DPO stage after it, which this "
                  "recipe no longer runs: running it again to save the merged model")
            rd.redo.add(f"round_{r}/sft")
        sft = rd.run_stage(r, "sft", job, _with_user_data({"model": start, "data": data}, rc, "sft"))
        policy = rd.output(sft, "model")

    # On the latest pairs only (they are close to the current policy), with the recipe's own (dpo.data).
    if dpo_follows:
        dpo = rd.run_stage(r, "dpo", _train_job(rc, "dpo"),
                           _with_user_data({"model": policy, "data": [pairs] if pairs else []}, rc, "dpo"))
        policy = rd.output(dpo, "model")
    return policy


def _sft_data(rd: RunDir, r: int) -> str | None:
    """The SFT set round `r` selected (best-of-K), or its generations when it had no select stage."""
    for stage, name in (("select", "sft"), ("generate", "generations")):
        entry = rd.entry(r, stage)
        if entry is not None:
            return rd.output(entry, name)
    return None


class Reports:
    """When report.md and its plots are rebuilt: after an eval when `every` seconds have passed since the last
    build (a round of a real run takes hours, plotting ~3 s), and at the end of the invocation whenever an eval came
    after the last build, the run failing included. A driver killed outright leaves the report at most `every`
    seconds behind; `posttrain-report RUN_DIR` rebuilds it."""

    def __init__(self, every: float = 300.0) -> None:
        self.every, self.built, self.pending = every, time.monotonic(), False

    def after_eval(self, root: Path) -> None:
        self.pending = True
        if time.monotonic() - self.built >= self.every:
            self.build(root)

    def build(self, root: Path) -> None:
        self.pending, self.built = False, time.monotonic()
        try:
            build_report(root)
        except Exception as e:  # noqa: BLE001 - a plotting problem must not stop a run whose stages are saved
            print(f"posttrain: warning: the report could not be built ({type(e).__name__}: {e}); "
                  f"rebuild it with `posttrain-report {root}`")


def run_eval(rd: RunDir, rc: DictConfig, r: int, policy: str, reports: Reports) -> None:
    """Evaluate `policy` on the held-out prompts as round `r` (0: the starting policy), then tell `reports`."""
    evals = section(rc, "evals")
    evals = dataclasses.replace(evals, rewards=evals.rewards or section(rc, "reward").rewards)
    inputs = {"policy": policy, "heldout": str(resolve_path(rc.evals.heldout))}
    rm = rd.entry(r, "rm") if rc.rm.enabled else None
    if rm is not None and "rm" not in evals.rewards:  # this round's reward model judges the eval too
        evals.rewards["rm"] = {"_target_": "reward.rm_scorer.RewardModelScorer", **section(rc, "rm").scorer}
        inputs["rm"] = rd.output(rm, "model")
    if r == 0 and rc.evals.teacher and rc.teacher is not None:
        inputs["teacher"] = rc.teacher.path
        evals = dataclasses.replace(evals, teacher_backend=OmegaConf.to_object(teacher_backend(rc)))
    if r > 0:
        previous, first = rd.entry(r - 1, "eval"), rd.entry(0, "eval")
        if previous is not None:
            inputs["previous"] = rd.output(previous, "responses")
        if first is not None and "teacher_responses" in first["outputs"]:
            inputs["teacher_responses"] = rd.output(first, "teacher_responses")
        wants_round0 = any("round0" in (node.get("against") or []) for node in evals.suites.values()
                           if isinstance(node, dict))
        if first is not None and wants_round0:  # only then: an input added to every eval would redo old runs' evals
            inputs["round0"] = rd.output(first, "responses")
    primary = rc.reward.primary or next(iter(rc.reward.rewards), None)
    # The prompts every round trains on: the eval stage checks again that none is in the held-out set.
    training = training_prompts(rc)
    entry = rd.run_stage(r, "eval", EvalJob(evals=evals, round=r, seed=rc.seed, primary=primary,
                                            training_prompts=training, launch=section(rc, "launch")), inputs)
    if rd.dry_run:
        return
    if f"round_{r}/eval" in rd.ran:  # the tracker gets each round's results once, when they are made
        try:
            log_eval(list(rc.evals.report_to if rc.evals.report_to is not None else rc.sft.report_to), rd.root, r,
                     entry["metrics"])
        except Exception as e:  # noqa: BLE001 - a tracker's failure must not stop a run whose stages are saved
            print(f"posttrain: warning: round {r}'s eval metrics did not reach the tracker ({type(e).__name__}: "
                  f"{e}); they are in {rd.root / entry['dir'] / 'metrics.json'}")
    reports.after_eval(rd.root)


def run(cfg: DictConfig, run_dir: str | None = None, stages: list[Stage] = STAGES,
        overrides: list[str] = ()) -> RunDir:
    """Bring the run in `run_dir` (default `cfg.run_dir`) up to round `cfg.round`. `stages`: the stage table
    (tests swap in stub stages with the same names); `overrides`: the command line's, kept (redacted) in
    overrides.yaml beside config.yaml."""
    launch = {"launcher": OmegaConf.select(cfg, "launch.launcher"),
              "preload": OmegaConf.select(cfg, "launch.preload", default=True)}
    if not cfg.dry_run and cfg.round >= 1 and stages is STAGES and forkserver.usable(launch):
        forkserver.start()  # its imports run beside the validation's (posttrain/train/forkserver.py)
    rounds = validate(cfg)
    rd = RunDir(run_dir or cfg.run_dir, stages, redo=list(cfg.redo), dry_run=cfg.dry_run)
    log = contextlib.ExitStack()
    reports = Reports()
    try:
        if cfg.dry_run:
            print(f"dry run: the plan for {rd.root}, up to round {cfg.round}; nothing is loaded, run or written")
        else:
            rd.write_config(OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True)))),
                            overrides=overrides)
            log.enter_context(driver_log(rd.root / "cli.log", overrides))
            log.enter_context(keeping_models())  # the eval's policy serves the next round's generate
        policy, prompt_start = cfg.model.path, 0
        start = round_config(cfg, 0)
        if start.evals.heldout:
            run_eval(rd, start, 0, policy, reports)
        for r, rc in enumerate(rounds, 1):
            policy = run_round(rd, rc, r, policy, prompt_start)
            prompt_start += rc.data.num_prompts
            if rc.evals.heldout:
                run_eval(rd, rc, r, policy, reports)
        if reports.pending:
            reports.build(rd.root)
        if not cfg.dry_run:
            print(summary(rd))
            if any(e["stage"] == "eval" for e in rd.manifest["stages"]):
                print(terminal_table(rd.root))
                print(f"report: {rd.root / 'report.md'}")
    except BaseException as e:
        print(f"posttrain: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=_log_only())
        if reports.pending:  # the evals that finished before the failure
            reports.build(rd.root)
        raise
    finally:
        log.close()
        rd.close()
    return rd


class _Tee(io.TextIOBase):
    """Writes go to the terminal's stream and to the log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


@contextlib.contextmanager
def driver_log(path: Path, overrides) -> Iterator:
    """The driver's stdout (stage headers, warnings, the summary and the eval table) copied into the run
    directory's `cli.log`, appended to by every invocation under a line with its time and (redacted) overrides.
    Progress bars (stderr) and training processes (their own train.log) stay out of it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} posttrain "
                f"{' '.join(redact_override(o) for o in overrides)}\n")
        with contextlib.redirect_stdout(_Tee(sys.stdout, f)):
            yield f


def _log_only():
    """Where the closing error line goes: the log when one is open (the terminal gets it from the command)."""
    tee = sys.stdout if isinstance(sys.stdout, _Tee) else None
    return tee.log if tee is not None else io.StringIO()


def summary(rd: RunDir) -> str:
    lines = [f"run directory: {rd.root}", f"{'stage':<20}{'rows':>8}{'seconds':>10}  status"]
    for e in rd.manifest["stages"]:
        sid = f"round_{e['round']}/{e['stage']}"
        rows = e["rows"] if isinstance(e["rows"], int) else sum(e["rows"].values())
        status = "ran" if sid in rd.ran else "done earlier"
        lines.append(f"{sid:<20}{rows:>8}{e['seconds']:>10.1f}  {status}")
    return "\n".join(lines)
