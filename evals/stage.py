"""The eval stage: the round's policy answers held-out prompts, and every configured suite measures the answers.

It runs at the end of every round, and once as round 0 for the starting policy, always on the same held-out
prompts, so the rounds compare like with like. Held-out prompts never enter training: `check_heldout` makes an
overlap with any training prompt source an error. What it writes in `round_N/07_eval/`:

    responses/          the policy's answers (a `datasets` folder; the generate stage's columns, one row per
                        held-out prompt, plus one `reward.<name>` column per configured reward)
    teacher_responses/  the teacher's answers, made once (in round 0) when the stage is given a `teacher`
    metrics.json        {suite name: {metric name: number or null}}
    <suite>/            whatever a suite keeps for inspection (the verifiable-accuracy answers)

A suite is any callable `(EvalContext) -> {metric: value}` named by `_target_`; see evals/suites.py.

The held-out prompts are answered and scored by every reward in shards of `launch.data.eval_shard_prompts` prompts
(posttrain/shards.py): a crash keeps the finished shards, and `launch.data.nproc.eval` processes per node share
them, with the same answers as one process (shard 0 samples with the stage's seed, shard i > 0 with one derived
from it and i). The suites then run in the driver on all the answers.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from hydra.utils import instantiate

from data_gen.backend import PromptsRejected, Sampling, build_backend
from data_gen.generate import GENERATION_FEATURES
from data_gen.prompts import load_prompts
from posttrain.config import DataLaunch, EvalJob
from posttrain.errors import PosttrainError
from posttrain.models import keep_model
from posttrain.rundir import Inputs, StageResult, stable_hash, write_text_atomic
from posttrain.shards import Shards, publish, run_ranks, shard_plan
from posttrain.timing import Phases
from reward.protocol import build_reward, with_trained_model
from reward.score import reward_prompt, score_rows


def prompt_text(messages: list[dict]) -> str:
    """The words of a prompt's non-system turns, case-folded, punctuation dropped and spaces collapsed: two
    prompts that differ only in case, punctuation or spacing ask the same thing.

    >>> prompt_text([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is  the sky BLUE?"}])
    'why is the sky blue'
    """
    text = "\n".join(m["content"] for m in messages if m["role"] != "system")
    return " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def check_heldout(heldout_prompts: list[dict], training_sources: list, split: str = "train") -> None:
    """Raise PosttrainError when a held-out prompt (rows as `data_gen.prompts.load_prompts` gives them) shares its
    id or its normalised text (`prompt_text`) with a prompt of any training source (paths, specs or source
    mappings, posttrain.sources; `split` for those that name none); the message names the overlapping prompts.
    Training on eval prompts would make every later metric meaningless."""
    from posttrain.sources import parse_sources

    by_id = {p["prompt_id"]: p for p in heldout_prompts}
    by_text = {prompt_text(p["messages"]): p for p in heldout_prompts}
    clashes: dict[str, str] = {}  # held-out prompt id -> why
    sources = {repr(s.spec()): s for item in training_sources for s in parse_sources(item, "data.prompts", split)}
    for source in sources.values():
        for p in load_prompts(source, on_empty="quarantine").prompts:
            text = prompt_text(p["messages"])
            if p["prompt_id"] in by_id:
                clashes.setdefault(p["prompt_id"], f"id {p['prompt_id']!r} is also a training prompt id in {source}")
            elif text in by_text:
                held = by_text[text]["prompt_id"]
                clashes.setdefault(held, f"{held!r} has the text of training prompt {p['prompt_id']!r} in {source}: "
                                         f"{text[:60]!r}")
    if clashes:
        listed = "\n  - ".join(list(clashes.values())[:10])
        more = f"\n  ... and {len(clashes) - 10} more" if len(clashes) > 10 else ""
        raise PosttrainError(
            f"{len(clashes)} of {len(heldout_prompts)} held-out prompts overlap the training prompts (same id or "
            f"same text); held-out prompts must never be trained on. Remove them from one of the sets:\n  - "
            f"{listed}{more}"
        )


@dataclass
class EvalContext:
    """What a suite sees. Response rows have the generate stage's columns (prompt_id, messages, meta, text,
    completion_tokens, finish_reason, ...), one row per held-out prompt; `previous` (the previous round's
    policy), `round0` (the starting policy's answers) and `teacher` are None where the stage has none."""

    round: int
    policy: str  # model spec or folder of the policy under evaluation
    responses: list[dict]
    previous: list[dict] | None
    teacher: list[dict] | None
    rewards: dict[str, Any]  # name -> built Reward
    generate: Callable[[list[list[dict]]], list[dict]]  # chat prompts -> one answer dict each, from the policy
    out: Path  # the stage folder
    training_prompts: list = field(default_factory=list)
    round0: list[dict] | None = None
    batch_size: int = 64
    suite: str = ""  # the name of the suite being run; its own files go under out / suite
    primary: str | None = None  # the reward that judges when a suite names none (the recipe's reward.primary)
    judged_by: dict[str, str] = field(default_factory=dict)  # suite -> the reward it compared with
    quarantined: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    _scores: dict[tuple[str, str], list] = field(default_factory=dict)

    def scores(self, reward: str, side: str = "policy") -> list[float | None]:
        """Scores of reward `reward` for the rows of `side` ("policy", "previous", "round0" or "teacher"), computed
        once.
        Every side is scored by this round's reward, so a comparison never mixes two scorers."""
        if reward not in self.rewards:
            raise PosttrainError(f"eval suite {self.suite!r} asks for reward {reward!r}; the eval rewards are "
                                 f"{sorted(self.rewards)}")
        key = (reward, side)
        if key not in self._scores:
            rows = {"policy": self.responses, "previous": self.previous, "round0": self.round0,
                    "teacher": self.teacher}[side]
            scores, quarantine = score_rows(f"{reward} ({side})", self.rewards[reward],
                                            [reward_prompt(r) for r in rows], [r["text"] for r in rows],
                                            self.batch_size)
            self._scores[key], self.quarantined[key] = scores, quarantine
        return self._scores[key]


def load_responses(path: str) -> list[dict]:
    """Rows of a responses dataset, given its folder or an eval stage folder holding `responses/`."""
    p = Path(path)
    if (p / "responses").is_dir():
        p = p / "responses"
    return datasets.load_from_disk(str(p)).to_list()


def _answer(generate: Callable, prompts: list[dict], model: str, round_idx: int) -> list[dict]:
    """Response rows (the generate stage's columns) for `prompts`, one answer each from `generate`."""
    answers = generate([p["messages"] for p in prompts])
    return [
        {"prompt_id": p["prompt_id"], "messages": p["messages"], "meta": json.dumps(p["meta"], sort_keys=True,
         default=str), "sample_idx": 0, **a, "model": model, "round": round_idx}
        for p, a in zip(prompts, answers, strict=True)
    ]


def _one_each(backend, sampling: Sampling) -> Callable[[list[list[dict]]], list[dict]]:
    """One answer per prompt; a prompt the backend's server refuses (PromptsRejected) gets an empty answer with
    finish_reason "rejected", kept and counted rather than failing the eval."""
    def answer(messages: list[list[dict]]) -> list[dict]:
        try:
            results = backend.generate(messages, 1, sampling)
        except PromptsRejected as e:
            print(f"posttrain: warning: eval: {e}; those prompts get an empty answer (finish_reason 'rejected')",
                  file=sys.stderr)
            refused = {"text": "", "prompt_tokens": 0, "completion_tokens": 0, "finish_reason": "rejected"}
            results = [r if r is not None else [refused] for r in e.results]
        return [samples[0] for samples in results]

    return answer


def _save(rows: list[dict], path: Path, scores: dict[str, list] | None = None) -> None:
    ds = datasets.Dataset.from_list([{k: r[k] for k in GENERATION_FEATURES} for r in rows],
                                    features=GENERATION_FEATURES)
    for name, values in (scores or {}).items():
        ds = ds.add_column(f"reward.{name}", values, feature=datasets.Value("float64"))
    shutil.rmtree(path, ignore_errors=True)  # left by an attempt cut short (the stage resumes for its journal)
    ds.save_to_disk(str(path))


def _clean(suite: str, result: Any) -> dict[str, float | int | None]:
    if not isinstance(result, dict):
        raise PosttrainError(f"eval suite {suite!r} returned {type(result).__name__}, not a dict of metrics")
    out: dict[str, float | int | None] = {}
    for k, v in result.items():
        if v is not None and not isinstance(v, (int, float)):
            try:
                v = float(v)  # numpy scalars
            except (TypeError, ValueError):
                raise PosttrainError(f"eval suite {suite!r}: metric {k!r} is {v!r}, not a number") from None
        out[str(k)] = None if isinstance(v, float) and not math.isfinite(v) else v
    return out


_LOADED: dict[str, Any] = {}  # what this process's shards built (policy backend, rewards), for its suites


def _loaded(key: Any, build: Callable[[], Any]) -> Any:
    """`build()` once per process for `key` (a plain value): the driver's suites reuse what its own shards
    loaded instead of loading the policy or a reward model twice."""
    name = stable_hash(key)
    if name not in _LOADED:
        _LOADED[name] = build()
    return _LOADED[name]


def _policy_key(backend_cfg: dict, policy: str) -> list:
    return ["policy", backend_cfg, policy]


def _policy_backend(backend_cfg: dict, policy: str) -> Any:
    """The backend answering as the policy, built once per process (`_loaded`)."""
    return _loaded(_policy_key(backend_cfg, policy), lambda: instantiate(backend_cfg, model=policy, _convert_="all"))


def _response_features(rewards: list[str]) -> datasets.Features:
    return datasets.Features({**GENERATION_FEATURES, **{f"reward.{n}": datasets.Value("float64") for n in rewards}})


def eval_shards(settings: dict, rank: int, world: int) -> None:
    """One rank's part of the stage (posttrain.shards.run_ranks): the policy answers each of its shards of
    held-out prompts and every eval reward scores the answers; written with the quarantine records."""
    out = Path(settings["out"])
    prompts = [json.loads(line) for line in open(out / "heldout.jsonl")]
    size = settings["shard_prompts"]
    shards = Shards(out, -(-len(prompts) // size), rank, world, desc=settings["desc"], attempt=settings["attempt"])
    todo = shards.todo()
    if not todo:
        return
    backend = _policy_backend(settings["backend"], settings["policy"])
    rewards = {name: _loaded(["reward", name, node, settings["inputs"]],
                             lambda name=name, node=node: build_reward(with_trained_model(name, node,
                                                                                          settings["inputs"])))
               for name, node in settings["rewards"].items()}
    features = _response_features(list(rewards))
    for i in todo:
        started = time.perf_counter()
        seed = settings["seed"] if i == 0 else int(stable_hash([settings["seed"], i]), 16) % (2**31)
        sampling = Sampling(**settings["sampling"], seed=seed)
        rows = _answer(_one_each(backend, sampling), prompts[i * size : (i + 1) * size], settings["policy"],
                       settings["round"])
        columns = {k: [r[k] for r in rows] for k in GENERATION_FEATURES}
        quarantine = []
        for name, fn in rewards.items():
            scores, q = score_rows(f"{name} (policy)", fn, [reward_prompt(r) for r in rows], [r["text"] for r in rows],
                                   settings["batch_size"], progress=False)
            columns[f"reward.{name}"] = scores
            quarantine += [{**r, "row": i * size + r["row"]} for r in q]
        write_text_atomic(shards.path(i).with_suffix(".quarantine"),
                          "".join(json.dumps(q) + "\n" for q in quarantine))
        shards.finish(i, columns, features, tokens=sum(r["completion_tokens"] for r in rows),
                      seconds=time.perf_counter() - started)


def _shard_prompts(wanted: int, *batches: int | None) -> int:
    """`wanted` rounded up to a multiple of every batch size given, so no batch straddles two shards."""
    step = math.lcm(*(int(b) for b in batches if b)) if any(batches) else 1
    return -(-max(wanted, 1) // step) * step


def eval_stage(job: EvalJob, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `job`: the recipe's `evals` section (its `rewards` filled in: name -> Reward `_target_`
    config) plus `round`, `seed` and `training_prompts` (sources the held-out set must not overlap). `inputs`:
    `policy` (model spec), `heldout` (prompt source), optionally `previous` (the previous round's responses),
    `round0` (round 0's responses: the starting policy), `teacher` (a model spec: its answers are made and saved
    as `teacher_responses/`) or `teacher_responses` (saved ones), and `rm` (the folder of a reward model this run
    trained: the `model` of the eval reward named `rm`).
    Writes `responses/`, `metrics.json` and, given `teacher`, `teacher_responses/`; returns the metrics."""
    cfg = job.evals
    heldout = load_prompts(inputs["heldout"], split=cfg.split).prompts[: cfg.num_prompts]
    training = list(job.training_prompts)
    if training:  # each a path (split "train") or a mapping naming its split
        check_heldout(heldout, training, "train")
    # Built before any model loads, so a bad suite config (or a missing extra) costs nothing.
    suites = {name: instantiate(node, _recursive_=False, _convert_="all")  # nested configs are the suite's own
              for name, node in cfg.suites.items()}
    # Greedy by default: a round-to-round difference then comes from the policy, not from sampling noise.
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                        seed=job.seed)
    backend_cfg = cfg.backend
    outputs = {"responses": "responses", "metrics": "metrics.json"}

    teacher = None
    phases = Phases()
    if inputs.get("teacher"):
        with phases("teacher"):  # load and answer
            backend = build_backend(cfg.teacher_backend or backend_cfg, inputs["teacher"],
                                    journal_dir=str(out / "journal"))  # a paid endpoint's answers survive a crash
            teacher = _answer(_one_each(backend, sampling), heldout, inputs["teacher"], job.round)
            del backend  # free the teacher before the policy loads
        _save(teacher, out / "teacher_responses")
        outputs["teacher_responses"] = "teacher_responses"
    elif inputs.get("teacher_responses"):
        teacher = load_responses(inputs["teacher_responses"])

    launch = asdict(job.launch)
    data = launch.get("data") or asdict(DataLaunch())
    wanted = _shard_prompts(int(data["eval_shard_prompts"]), backend_cfg.get("batch_size"), cfg.batch_size)
    size = shard_plan(out, {"shard_prompts": wanted})["shard_prompts"]
    write_text_atomic(out / "heldout.jsonl", "".join(json.dumps(p, default=str) + "\n" for p in heldout))
    settings = {"out": str(out), "shard_prompts": size, "backend": backend_cfg, "policy": inputs["policy"],
                "rewards": dict(cfg.rewards), "inputs": dict(inputs), "batch_size": cfg.batch_size, "seed": job.seed,
                "round": job.round, "desc": f"round {job.round} eval",
                "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}}
    started = time.perf_counter()
    with phases("answer"):  # load the policy, answer, score the answers with every reward
        attempt = run_ranks("evals.stage:eval_shards", settings, out, launch, "eval")
    shards = Shards(out, -(-len(heldout) // size), desc=settings["desc"], attempt=attempt)
    throughput = shards.throughput(time.perf_counter() - started)
    quarantine = [json.loads(line) for i in range(shards.n) for line in open(shards.path(i).with_suffix(".quarantine"))]
    if publish(shards.files(), out / "responses", _response_features(list(cfg.rewards))) != len(heldout):
        raise PosttrainError(f"eval: the shards in {shards.dir} do not hold one answer per held-out prompt "
                             f"({len(heldout)}); delete {shards.dir} to answer again")
    scored = datasets.load_from_disk(str(out / "responses")).to_list()  # held-out sets are small
    responses = [{k: r[k] for k in GENERATION_FEATURES} for r in scored]

    def generate(messages: list[list[dict]]) -> list[dict]:  # for suites with prompts of their own
        return _one_each(_policy_backend(backend_cfg, inputs["policy"]), sampling)(messages)

    ctx = EvalContext(
        round=job.round,
        policy=inputs["policy"],
        responses=responses,
        previous=load_responses(inputs["previous"]) if inputs.get("previous") else None,
        teacher=teacher,
        round0=load_responses(inputs["round0"]) if inputs.get("round0") else None,
        rewards={name: _loaded(["reward", name, node, dict(inputs)],
                               lambda name=name, node=node: build_reward(with_trained_model(name, node, inputs)))
                 for name, node in cfg.rewards.items()},
        generate=generate,
        out=out,
        training_prompts=training,
        batch_size=cfg.batch_size,
        primary=job.primary,
    )
    for name in cfg.rewards:  # the policy's answers were scored with them
        ctx._scores[(name, "policy")] = [r[f"reward.{name}"] for r in scored]
        ctx.quarantined[(name, "policy")] = [q for q in quarantine if q["reward"] == f"{name} (policy)"]
    try:
        with phases("score"):  # every suite (a suite may answer prompts of its own)
            metrics: dict[str, dict] = {}
            for name, suite in suites.items():
                ctx.suite = name
                metrics[name] = _clean(name, suite(ctx))
    finally:
        # The policy's model stays for the next round's generate (posttrain.models.keeping_models); the rest goes.
        keep_model(getattr(_LOADED.get(stable_hash(_policy_key(backend_cfg, inputs["policy"]))), "model", None))
        _LOADED.clear()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(shards.dir)  # last: a crash before this point leaves every shard for the rerun
    (out / "heldout.jsonl").unlink()
    rows = {"responses": len(responses)}
    if "teacher_responses" in outputs:
        rows["teacher_responses"] = len(teacher)
    return StageResult(outputs=outputs, rows=rows,
                       metrics={**metrics, "judged_by": ctx.judged_by, "seconds": phases.seconds(),
                                "throughput": throughput})
