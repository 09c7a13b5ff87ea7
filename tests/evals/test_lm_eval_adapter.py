"""The lm-evaluation-harness suite: a local task on the tiny model, offline; a clear message without the extra."""

import json
import sys

import pytest

from evals.lm_eval_adapter import LMEvalSuite, flatten_results
from evals.stage import eval_stage
from posttrain.config import EvalConfig, EvalJob
from posttrain.errors import PosttrainError

ROWS = [
    {"question": "The capital of France is", "choices": ["Paris", "a fox"], "answer": 0},
    {"question": "There are 7 days in a", "choices": ["week", "river"], "answer": 0},
    {"question": "Water boils at 100 degrees", "choices": ["Celsius", "bananas"], "answer": 0},
    {"question": "Red, green and", "choices": ["blue", "seven"], "answer": 0},
]


def _local_task(folder):
    """A multiple-choice lm-eval task over a local JSONL file: no download."""
    folder.mkdir()
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\n  cache_dir: {folder / 'cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_without_the_extra_the_message_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    with pytest.raises(PosttrainError, match=r"pip install 'posttrain\[eval\]'"):
        LMEvalSuite(tasks=["tiny_mc"])


def test_results_flatten_to_numeric_metrics():
    results = {"tiny_mc": {"alias": "tiny_mc", "acc,none": 0.75, "acc_stderr,none": 0.25, "em,strict": 1.0}}
    assert flatten_results(results, {"tiny_mc": {"original": 4, "effective": 4}}) == {
        "tiny_mc.acc": 0.75, "tiny_mc.acc_stderr": 0.25, "tiny_mc.em_strict": 1.0, "tiny_mc.n": 4}


def test_local_task_on_the_tiny_checkpoint_lands_in_metrics_json(tmp_path, tiny_model_dir):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'posttrain[eval]'")
    tasks = _local_task(tmp_path / "tasks")
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"id": "h1", "prompt": "Say hello."}\n')
    cfg = EvalJob(evals=EvalConfig(max_new_tokens=4, suites={"harness": {
        "_target_": "evals.lm_eval_adapter.LMEvalSuite", "tasks": ["tiny_mc"], "include_path": str(tasks),
        "include_defaults": False, "batch_size": 4, "device": "cpu", "dtype": "float32"}}), round=2)
    out = tmp_path / "eval"
    out.mkdir()
    result = eval_stage(cfg, {"policy": str(tiny_model_dir), "heldout": str(heldout)}, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {k: v for k, v in result.metrics.items() if k not in ("judged_by", "seconds", "throughput")}
    harness = metrics["harness"]
    assert harness["tiny_mc.n"] == len(ROWS)
    assert harness["tiny_mc.acc"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert "tiny_mc" in json.loads((out / "harness" / "results.json").read_text())["results"]

    suite = LMEvalSuite(tasks=["no_such_task"], include_path=str(tasks), include_defaults=False, device="cpu")
    ctx = type("Ctx", (), {"policy": str(tiny_model_dir), "out": out, "suite": "harness"})()
    with pytest.raises(PosttrainError, match=r"lm-eval knows no task \['no_such_task'\]"):
        suite(ctx)
