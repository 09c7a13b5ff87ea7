"""Data stages on several processes (torchrun, CPU): the same bytes as one process, and per-shard resume after a
rank is SIGKILLed. The ranks import this module for the rewards below (tests.recipes.test_data_parallel.*)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import datasets
import pytest

from data_gen.generate import generate
from evals.stage import eval_stage
from posttrain.config import (
    DataConfig,
    DataLaunch,
    EvalConfig,
    EvalJob,
    GenerateConfig,
    GenerateJob,
    LaunchConfig,
    ScoreJob,
)
from posttrain.rundir import tree_hash
from reward.score import score


def words(prompts, responses):
    return [float(len(r.split())) for r in responses]


def logged_words(prompts, responses, log, kill_on=None, marker=None):
    """`words`, logging every text it scores (with the scoring process's pid); when a response is `kill_on` and
    `marker` does not exist yet, it creates `marker` and SIGKILLs its own process: a rank dying mid-stage."""
    with open(log, "a") as f:
        f.write("".join(json.dumps({"pid": os.getpid(), "text": r}) + "\n" for r in responses))
    if kill_on is not None and kill_on in responses and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return words(prompts, responses)


def _launch(nproc: int, score_rows: int = 4) -> LaunchConfig:
    return LaunchConfig(data=DataLaunch(nproc={"generate": nproc, "score": nproc, "eval": nproc},
                                        score_shard_rows=score_rows, eval_shard_prompts=2))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"Question {i}: name a colour."}) + "\n"
                            for i in range(6)))
    return path


def _stage_runs(tmp_path: Path, nproc: int, model: Path, prompts: Path) -> dict[str, Path]:
    launch = _launch(nproc)
    gen = tmp_path / f"generate_{nproc}"
    gen.mkdir()
    job = GenerateJob(generate=GenerateConfig(k=2, max_new_tokens=8, shard_size=2, backend={
        "_target_": "data_gen.hf_backend.HFBackend", "batch_size": 2}), data=DataConfig(
        prompts=str(prompts), num_prompts=6), round=1, seed=3, launch=launch)
    generate(job, {"prompts": str(prompts), "model": str(model)}, gen)
    scored = tmp_path / f"score_{nproc}"
    scored.mkdir()
    score(ScoreJob(rewards={"words": {"_target_": "tests.recipes.test_data_parallel.words"}}, batch_size=2,
                   launch=launch), {"generations": str(gen / "generations")}, scored)
    ev = tmp_path / f"eval_{nproc}"
    ev.mkdir()
    evals = EvalConfig(heldout=str(prompts), temperature=0.7, max_new_tokens=8,
                       backend={"_target_": "data_gen.hf_backend.HFBackend", "batch_size": 2},
                       rewards={"words": {"_target_": "tests.recipes.test_data_parallel.words"}},
                       suites={"reward": {"_target_": "evals.suites.RewardSuite"}})
    eval_stage(EvalJob(evals=evals, round=1, seed=5, launch=launch), {"policy": str(model), "heldout": str(prompts)},
               ev)
    return {"generations": gen / "generations", "scored": scored / "scored", "responses": ev / "responses",
            "metrics": ev / "metrics.json"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, prompts):
    tmp_path = tmp_path_factory.mktemp("runs")
    one = _stage_runs(tmp_path, 1, tiny_model_dir, prompts)
    return tmp_path, one, _stage_runs(tmp_path, 2, tiny_model_dir, prompts)


def test_generate_score_and_eval_on_two_processes_write_the_same_bytes_as_one(runs):
    tmp_path, one, two = runs
    for name in one:
        assert tree_hash(one[name]) == tree_hash(two[name]), name
    # three shards of two prompts, two answers each; the second process did its share (its own log)
    assert len(datasets.load_from_disk(str(one["generations"]))) == 12
    assert (tmp_path / "generate_2" / "generate.log").exists()
    assert not (tmp_path / "generate_1" / "generate.log").exists()
    scored = datasets.load_from_disk(str(two["scored"]))
    assert scored["score"] == [float(len(t.split())) for t in scored["text"]]
    assert [f.name for f in sorted(one["scored"].iterdir())] == [
        "data-00000-of-00003.arrow", "data-00001-of-00003.arrow", "data-00002-of-00003.arrow", "dataset_info.json",
        "state.json"]  # 12 rows in shards of 4: the files published as they were written


def test_a_rank_killed_mid_score_reruns_only_its_unfinished_shards(tmp_path, runs):
    gen = runs[1]["generations"].parent
    rows = datasets.load_from_disk(str(gen / "generations"))
    texts = rows["text"]
    # shards of 2 rows: 6 shards, rank 1 of 2 takes shards 1, 3, 5; it dies on the first row of shard 3
    victim = texts[6]
    assert texts.count(victim) == 1
    log, marker = tmp_path / "scored.jsonl", tmp_path / "killed"
    reward = {"words": {"_target_": "tests.recipes.test_data_parallel.logged_words", "log": str(log),
                        "kill_on": victim, "marker": str(marker)}}
    out = tmp_path / "score"
    out.mkdir()
    with pytest.raises(Exception, match="exited with code"):
        score(ScoreJob(rewards=reward, batch_size=1, launch=_launch(2, score_rows=2)), {"generations": str(gen /
              "generations")}, out)
    assert marker.exists()
    first = [json.loads(line) for line in open(log)]
    finished = sorted(p.name for p in (out / "shards").glob("*.arrow"))
    assert "00003.arrow" not in finished and len(finished) < 6
    log.unlink()
    # resumed with another shard size (a launch setting, not part of the stage's hash): the first plan stands
    score(ScoreJob(rewards=reward, batch_size=1, launch=_launch(2, score_rows=3)),
          {"generations": str(gen / "generations")}, out)
    again = [json.loads(line)["text"] for line in open(log)]
    # the rerun scored exactly the rows of the shards that were not finished, once each
    redo = [i for i in range(6) if f"{i:05d}.arrow" not in finished]
    assert sorted(again) == sorted(t for i in redo for t in texts[2 * i : 2 * i + 2])
    assert len(first) >= 2 * len(finished)
    # and the result is the uninterrupted one-process run's, byte for byte
    ref = tmp_path / "ref"
    ref.mkdir()
    score(ScoreJob(rewards={"words": {**reward["words"], "kill_on": None}}, batch_size=1,
                   launch=_launch(1, score_rows=2)), {"generations": str(gen / "generations")}, ref)
    assert tree_hash(out / "scored") == tree_hash(ref / "scored")
    assert not (out / "shards").exists()
