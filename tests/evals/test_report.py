"""The run report: numbers in report.md are those of metrics.json, plots are real PNGs with one point per round."""

import json
from pathlib import Path

import datasets
import pytest

from data_gen.generate import GENERATION_FEATURES
from evals.report import build_report, main, terminal_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _eval_metrics(r: int) -> dict:
    win = {"vs_teacher.win_rate": 0.25 + 0.125 * r, "vs_teacher.ci_low": 0.05 + 0.1 * r,
           "vs_teacher.ci_high": 0.6 + 0.1 * r, "vs_teacher.wins": 1 + r, "vs_teacher.ties": 0,
           "vs_teacher.losses": 3 - r, "vs_teacher.n": 4, "vs_teacher.unscored": 0}
    if r:
        win |= {"vs_previous.win_rate": 0.5 + 0.0625 * r, "vs_previous.ci_low": 0.2, "vs_previous.ci_high": 0.8,
                "vs_previous.wins": 2, "vs_previous.ties": 1, "vs_previous.losses": 1, "vs_previous.n": 4,
                "vs_previous.unscored": 0}
    return {
        "reward": {"rm.count": 4, "rm.none": 0, "rm.mean": 0.123456789 * (r + 1), "rm.std": 0.0421 + r / 1000,
                   "rm.p50": 1 / 3 + r, "rm.corr_length": None if r == 0 else 0.31 * r},
        "win_rate": win,
        "drift": {"mean_tokens": 12.5 * (r + 1), "distinct_2": 0.9 - 0.1 * r, "refusal_rate": 0.0},
    }


def make_fake_run(root: Path, rounds: int = 3) -> dict[int, dict]:
    """A run directory written by hand: round 0 evaluates the start; rounds 1.. generate, score, select, train and
    evaluate. Answers get longer and better every round."""
    stages, metrics = [], {}
    for r in range(rounds):
        folder = root / f"round_{r}" / "07_eval"
        folder.mkdir(parents=True)
        rows = [{"prompt_id": f"h{i}", "messages": [{"role": "user", "content": f"q{i}"}], "meta": "{}",
                 "sample_idx": 0, "text": "word " * (3 + i + 4 * r), "prompt_tokens": 5,
                 "completion_tokens": 3 + i + 4 * r, "finish_reason": "stop", "model": f"m{r}", "round": r}
                for i in range(4)]
        ds = datasets.Dataset.from_list(rows, features=GENERATION_FEATURES)
        ds = ds.add_column("reward.rm", [0.1 * i + 0.3 * r for i in range(4)], feature=datasets.Value("float64"))
        ds.save_to_disk(str(folder / "responses"))
        metrics[r] = _eval_metrics(r)
        (folder / "metrics.json").write_text(json.dumps(metrics[r]))
        if r:
            stages += [
                {"round": r, "stage": "generate", "rows": 8, "seconds": 2.0,
                 "metrics": {"prompts": 4, "mean_completion_tokens": 10.0 + 5 * r}},
                {"round": r, "stage": "score", "rows": 8, "seconds": 1.0, "metrics": {"primary": "rm", "rewards": {
                    "rm": {"count": 8, "none": 0, "mean": 0.2 * r, "p10": 0.1 * r, "p50": 0.2 * r, "p90": 0.3 * r}}}},
                {"round": r, "stage": "filter", "rows": {"kept": 8 - r, "removed": r}, "seconds": 0.5, "metrics": {
                    "filters": {"rules": {"removed": r, "reasons": {"emoji": r}},
                                "dedup": {"removed": 0, "reasons": {}}}}},
                {"round": r, "stage": "select", "rows": {"sft": 4, "pairs": 4 - r}, "seconds": 0.5, "metrics": {}},
                {"round": r, "stage": "sft", "rows": 3, "seconds": 30.0, "metrics": {}},
            ]
        stages.append({"round": r, "stage": "eval", "dir": f"round_{r}/07_eval",
                       "inputs": {"policy": f"round_{r}/04_sft/model" if r else "tiny://"},
                       "outputs": {"responses": f"round_{r}/07_eval/responses",
                                   "metrics": f"round_{r}/07_eval/metrics.json"},
                       "rows": {"responses": 4}, "seconds": 3.0, "metrics": metrics[r]})
    (root / "manifest.json").write_text(json.dumps({"stages": stages, "superseded": []}))
    return metrics


def test_report_numbers_equal_metrics_json(tmp_path, report_tables, report_matches):
    metrics = make_fake_run(tmp_path)
    path = build_report(tmp_path)
    assert path == tmp_path / "report.md"
    md = path.read_text()
    report_matches(md, metrics)
    tables = report_tables(md)
    summary = {row[0]: dict(zip(tables["Summary (held-out eval)"][0], row))
               for row in tables["Summary (held-out eval)"][1:]}
    assert float(summary["2"]["reward.rm.mean"]) == pytest.approx(metrics[2]["reward"]["rm.mean"], rel=1e-3)
    assert summary["1"]["win_rate.vs_previous.win_rate"] == "0.5625 [0.2, 0.8]"
    assert summary["0"]["win_rate.vs_previous.win_rate"] == "-"
    counts = {row[0]: dict(zip(tables["Data per round (rows each stage wrote)"][0], row))
              for row in tables["Data per round (rows each stage wrote)"][1:]}
    assert counts["2"]["select.pairs"] == "2" and counts["1"]["select.sft"] == "4" and counts["0"]["sft"] == "-"
    for png in ("eval_reward.png", "eval_win_rate.png", "eval_drift.png", "reward_distributions.png",
                "length_drift.png", "train_rewards.png"):
        assert f"(plots/{png})" in md


def test_plots_are_valid_pngs_with_one_point_per_round(tmp_path):
    from matplotlib.image import imread

    metrics = make_fake_run(tmp_path)
    build_report(tmp_path)
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert {p.name for p in pngs} == {"eval_reward.png", "eval_win_rate.png", "eval_drift.png",
                                      "reward_distributions.png", "length_drift.png", "train_rewards.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = imread(p).shape
        assert height > 100 and width > 100
    data = json.loads((tmp_path / "plots" / "data.json").read_text())
    for suite in ("reward", "win_rate", "drift"):  # every metric is a line with one point per round it has
        lines = {name: line for panel in data[f"eval_{suite}.png"].values() for name, line in panel.items()}
        assert set(lines) == {k for m in metrics.values() for k in m[suite]}
        for name, line in lines.items():
            rounds = [float(r) for r in sorted(metrics) if metrics[r][suite].get(name) is not None]
            assert line["x"] == rounds, name
            assert line["y"] == pytest.approx([metrics[int(r)][suite][name] for r in rounds])
    win = data["eval_win_rate.png"]["vs_previous"]
    assert set(win) == {"vs_previous.win_rate", "vs_previous.ci_low", "vs_previous.ci_high"}
    assert win["vs_previous.win_rate"]["x"] == [1.0, 2.0]
    assert data["reward_distributions.png"]["rm"]["mean"]["x"] == [0.0, 1.0, 2.0]
    drift = data["length_drift.png"]["answer length (tokens)"]
    assert drift["held-out answers (mean)"] == {"x": [0.0, 1.0, 2.0], "y": [4.5, 8.5, 12.5]}
    assert drift["training generations (mean)"] == {"x": [1.0, 2.0], "y": [15.0, 20.0]}
    assert data["train_rewards.png"]["rm"]["mean"]["y"] == pytest.approx([0.2, 0.4])


def test_rebuild_after_a_new_round_and_stale_plots_go(tmp_path):
    make_fake_run(tmp_path)
    full = json.loads((tmp_path / "manifest.json").read_text())
    two_rounds = {**full, "stages": [e for e in full["stages"] if e["round"] < 2]}
    (tmp_path / "manifest.json").write_text(json.dumps(two_rounds))
    build_report(tmp_path)
    data = json.loads((tmp_path / "plots" / "data.json").read_text())
    assert data["eval_reward.png"]["rm"]["rm.mean"]["x"] == [0.0, 1.0]
    (tmp_path / "plots" / "eval_dropped_suite.png").write_bytes(PNG_SIGNATURE)

    (tmp_path / "manifest.json").write_text(json.dumps(full))  # round 2 finished
    build_report(tmp_path)
    data = json.loads((tmp_path / "plots" / "data.json").read_text())
    assert data["eval_reward.png"]["rm"]["rm.mean"]["x"] == [0.0, 1.0, 2.0]
    assert "round 2" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "plots" / "eval_dropped_suite.png").exists()


def test_report_after_round_0_only_leaves_out_suites_without_metrics(tmp_path):
    """After round 0 a win rate against the previous round or round 0 has nothing to compare yet."""
    make_fake_run(tmp_path, rounds=1)
    metrics = json.loads((tmp_path / "round_0" / "07_eval" / "metrics.json").read_text())
    metrics["win_rate"] = {}
    (tmp_path / "round_0" / "07_eval" / "metrics.json").write_text(json.dumps(metrics))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["stages"][0]["metrics"] = metrics
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    md = build_report(tmp_path).read_text()
    assert not (tmp_path / "plots" / "eval_win_rate.png").exists()
    assert (tmp_path / "plots" / "eval_reward.png").is_file() and "(plots/eval_reward.png)" in md
    assert "eval_win_rate.png" not in md


def test_terminal_table_and_command(tmp_path, capsys):
    make_fake_run(tmp_path)
    table = terminal_table(tmp_path)
    lines = table.splitlines()
    assert lines[0].split() == ["round", "0", "1", "2"]
    row = next(line for line in lines if line.startswith("reward.rm.mean "))
    assert row.split()[1:] == ["0.1235", "0.2469", "0.3704"]
    row = next(line for line in lines if line.startswith("win_rate.vs_previous.win_rate "))
    assert row.split()[1] == "-"
    assert next(line for line in lines if line.startswith("select.pairs rows")).split()[-3:] == ["-", "3", "2"]
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reward.rm.mean" in out and str(tmp_path / "report.md") in out
    assert main([str(tmp_path / "missing")]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_filter_removals_per_round_are_in_the_report(tmp_path):
    make_fake_run(tmp_path)
    text = build_report(tmp_path).read_text()
    section = text.split("## Rows removed by the filters")[1].split("##")[0]
    assert "| round | rules removed | dedup removed | rules: emoji |" in section
    assert "| 1 | 1 | 0 | 1 |" in section and "| 2 | 2 | 0 | 2 |" in section
