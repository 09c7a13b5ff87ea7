"""The round loop, read top to bottom like the paper's figure (Llama 3, section 4.1):

    [RM on all pairs so far] -> prompts -> generate (teacher or policy, K each) -> score (every reward)
        -> [filter: cleaning, dedup, quality] -> select (best-of-K for SFT, best vs worst for DPO)
        -> SFT (on every round's SFT data, from the base model) -> DPO (on this round's pairs) -> eval
        -> policy for the next round

Each stage is a plain function `(stage config, inputs, out_dir) -> StageResult` run through `RunDir.run_stage`,
which skips what already finished and resumes what did not.
"""

from __future__ import annotations

import re
from functools import partial

from omegaconf import DictConfig, OmegaConf

from data_gen.generate import generate
from evals.report import build_report, terminal_table
from posttrain.average import run_seeds
from evals.stage import eval_stage
from posttrain.config import round_config
from posttrain.models import resolve_path
from posttrain.rundir import RunDir
from posttrain.train.dpo import dpo_stage
from posttrain.train.rm import rm_stage
from posttrain.train.sft import sft_stage
from posttrain.validate import validate
from reward.filters import filter_stage
from reward.score import score
from reward.select import select

_SECRET = re.compile(r"(^|_)(api_key|apikey|secret|password|passwd|token|auth)$", re.IGNORECASE)


def redact(node):
    """A copy of a plain config container with the values of secret-looking keys replaced."""
    if isinstance(node, dict):
        return {k: "<redacted>" if _SECRET.search(str(k)) and v is not None else redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    return node


def _section(rc: DictConfig, key: str) -> dict:
    return OmegaConf.to_container(rc[key], resolve=True)


def run_round(rd: RunDir, rc: DictConfig, r: int, policy: str, prompt_start: int) -> str:
    """Run round `r` with its config `rc`, starting from `policy` (a model spec or folder) and reading prompts
    from position `prompt_start` of the seeded prompt stream; returns the policy for the next round."""
    reward_cfg = _section(rc, "reward")
    reward_inputs: dict[str, str] = {}
    if rc.rm.enabled:  # on all preference pairs so far (Llama 3: the RM sees all of it, DPO the latest)
        data = {f"data_round_{i}": rd.output(rd.entry(i, "select"), "pairs")
                for i in range(1, r) if rd.entry(i, "select") is not None}
        data |= {f"data_extra_{j}": str(resolve_path(p)) for j, p in enumerate(rc.rm.data)}
        if data:
            rm_cfg = {**_section(rc, "rm"), "seed": rc.seed, "launch": _section(rc, "launch")}
            rm_inputs = {"model": rc.rm.model or rc.model.path, **data}
            rm = rd.run_stage(r, "rm", rm_cfg, rm_inputs, partial(run_seeds, rm_stage, rm_cfg, rm_inputs), resumable=True)
            reward_cfg["rewards"]["rm"] = {"_target_": "reward.rm_scorer.RewardModelScorer"}
            reward_inputs["model.rm"] = rd.output(rm, "model")

    gen_model = rc.teacher.path if rc.generate.source == "teacher" else policy
    gen_cfg = {
        **_section(rc, "generate"),
        "round": r,
        "seed": rc.seed,
        "prompt_start": prompt_start,
        "data": _section(rc, "data"),
        "shard_size": rc.generate.backend.get("batch_size", 8),
    }
    gen_inputs = {"prompts": str(resolve_path(rc.data.prompts)), "model": gen_model}
    gen = rd.run_stage(r, "generate", gen_cfg, gen_inputs, partial(generate, gen_cfg, gen_inputs), resumable=True)
    sft_data, pairs = rd.output(gen, "generations"), None

    if reward_cfg["rewards"]:
        score_cfg = reward_cfg
        score_inputs = {"generations": sft_data, **reward_inputs}
        scored = rd.run_stage(r, "score", score_cfg, score_inputs, partial(score, score_cfg, score_inputs))
        candidates = rd.output(scored, "scored")
        if rc.filter.filters:
            filter_cfg = _section(rc, "filter")
            # Earlier rounds' SFT data, so a response already trained on is not trained on again.
            filter_inputs = {"scored": candidates, **{
                f"previous_sft_{i}": rd.output(rd.entry(i, "select"), "sft")
                for i in range(1, r) if rd.entry(i, "select") is not None
            }}
            filtered = rd.run_stage(r, "filter", filter_cfg, filter_inputs, partial(filter_stage, filter_cfg, filter_inputs))
            candidates = rd.output(filtered, "kept")
        select_cfg = {**_section(rc, "select"), "seed": rc.seed}
        select_inputs = {"scored": candidates}
        selected = rd.run_stage(r, "select", select_cfg, select_inputs, partial(select, select_cfg, select_inputs))
        sft_data, pairs = rd.output(selected, "sft"), rd.output(selected, "pairs")

    if rc.sft.enabled:
        sft_cfg = {**_section(rc, "sft"), "seed": rc.seed, "launch": _section(rc, "launch")}
        sft_inputs = {"model": rc.model.path if rc.sft.init == "base" else policy, f"data_round_{r}": sft_data}
        if rc.sft.accumulate:  # SFT data of earlier rounds (Llama 3 trains each round on everything so far)
            sft_inputs |= {f"data_round_{i}": _sft_data(rd, i) for i in range(1, r) if _sft_data(rd, i)}
        sft = rd.run_stage(r, "sft", sft_cfg, sft_inputs, partial(run_seeds, sft_stage, sft_cfg, sft_inputs), resumable=True)
        policy = rd.output(sft, "model")

    if rc.dpo.enabled and pairs is not None:  # on the latest pairs only: they are close to the current policy
        dpo_cfg = {**_section(rc, "dpo"), "seed": rc.seed, "launch": _section(rc, "launch")}
        dpo_inputs = {"model": policy, "data": pairs}
        dpo = rd.run_stage(r, "dpo", dpo_cfg, dpo_inputs, partial(run_seeds, dpo_stage, dpo_cfg, dpo_inputs), resumable=True)
        policy = rd.output(dpo, "model")
    return policy


def _sft_data(rd: RunDir, r: int) -> str | None:
    """The SFT set round `r` selected (best-of-K), or its generations when it had no select stage."""
    for stage, name in (("select", "sft"), ("generate", "generations")):
        entry = rd.entry(r, stage)
        if entry is not None:
            return rd.output(entry, name)
    return None


def run_eval(rd: RunDir, rc: DictConfig, r: int, policy: str) -> None:
    """Evaluate `policy` on the held-out prompts as round `r` (0: the starting policy), then rebuild the report."""
    ev = _section(rc, "evals")
    cfg = {**ev, "round": r, "seed": rc.seed, "rewards": ev["rewards"] or _section(rc, "reward")["rewards"]}
    inputs = {"policy": policy, "heldout": str(resolve_path(rc.evals.heldout))}
    if r == 0 and rc.evals.teacher and rc.teacher is not None:
        inputs["teacher"] = rc.teacher.path
    if r > 0:
        previous, first = rd.entry(r - 1, "eval"), rd.entry(0, "eval")
        if previous is not None:
            inputs["previous"] = rd.output(previous, "responses")
        if first is not None and "teacher_responses" in first["outputs"]:
            inputs["teacher_responses"] = rd.output(first, "teacher_responses")
        wants_round0 = any("round0" in (node.get("against") or []) for node in (ev["suites"] or {}).values()
                           if isinstance(node, dict))
        if first is not None and wants_round0:  # only then: an input added to every eval would redo old runs' evals
            inputs["round0"] = rd.output(first, "responses")
    rd.run_stage(r, "eval", cfg, inputs, partial(eval_stage, cfg, inputs))
    if rd.dry_run:
        return
    try:
        build_report(rd.root)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not stop a run whose stages are saved
        print(f"posttrain: warning: the report could not be built ({type(e).__name__}: {e}); "
              f"rebuild it with `posttrain-report {rd.root}`")


def run(cfg: DictConfig, run_dir: str | None = None) -> RunDir:
    """Bring the run in `run_dir` (default `cfg.run_dir`) up to round `cfg.round`."""
    rounds = validate(cfg)
    rd = RunDir(run_dir or cfg.run_dir, redo=list(cfg.redo), dry_run=cfg.dry_run)
    try:
        if cfg.dry_run:
            print(f"dry run: the plan for {rd.root}, up to round {cfg.round}; nothing is loaded, run or written")
        else:
            rd.write_config(OmegaConf.to_yaml(OmegaConf.create(redact(OmegaConf.to_container(cfg, resolve=True)))))
        policy, prompt_start = cfg.model.path, 0
        start = round_config(cfg, 0)
        if start.evals.heldout:
            run_eval(rd, start, 0, policy)
        for r, rc in enumerate(rounds, 1):
            policy = run_round(rd, rc, r, policy, prompt_start)
            prompt_start += rc.data.num_prompts
            if rc.evals.heldout:
                run_eval(rd, rc, r, policy)
    finally:
        rd.close()
    if cfg.dry_run:
        return rd
    print(summary(rd))
    if any(e["stage"] == "eval" for e in rd.manifest["stages"]):
        print(terminal_table(rd.root))
        print(f"report: {rd.root / 'report.md'}")
    return rd


def summary(rd: RunDir) -> str:
    lines = [f"run directory: {rd.root}", f"{'stage':<20}{'rows':>8}{'seconds':>10}  status"]
    for e in rd.manifest["stages"]:
        sid = f"round_{e['round']}/{e['stage']}"
        rows = e["rows"] if isinstance(e["rows"], int) else sum(e["rows"].values())
        status = "ran" if sid in rd.ran else "done earlier"
        lines.append(f"{sid:<20}{rows:>8}{e['seconds']:>10.1f}  {status}")
    return "\n".join(lines)
