"""The run report: `run_dir/report.md` and `run_dir/plots/*.png`, rebuilt from the run directory alone.

Reads `manifest.json` (row counts, the score stage's reward summaries, the generate stage's answer lengths) and
each round's `round_N/07_eval/metrics.json` and `responses/`. Writes:

    report.md                      per-round summary of the key metrics, data counts, every eval metric
    plots/eval_<suite>.png         every numeric metric of the suite against the round (round 0 = starting policy)
    plots/reward_distributions.png each eval reward's distribution over the held-out answers, per round
    plots/length_drift.png         answer length per round (held-out and training generations), reward vs length
    plots/train_rewards.png        the score stage's reward mean and p10-p90 per round, when rewards are scored
    plots/data.json                the x/y of every plotted line, read back from the figures

The loop rebuilds it after every round; `posttrain-report RUN_DIR` rebuilds it by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.errors import PosttrainError

# Metrics (by last name part) shown in the summary table and the terminal table; report.md lists every metric.
KEY_METRICS = ("mean", "win_rate", "accuracy", "prompt_level", "instruction_level", "mean_tokens", "distinct_2",
               "refusal_rate", "empty_rate", "acc", "acc_norm", "exact_match")


@dataclass
class RunData:
    root: Path
    rounds: list[int]  # every round with a finished stage
    stages: dict[int, dict[str, dict]]  # round -> stage -> manifest entry
    evals: dict[int, dict[str, dict]] = field(default_factory=dict)  # round -> suite -> metric -> value

    def series(self, suite: str, metric: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of one eval metric, over the rounds where it is a number."""
        pts = [(r, m[suite][metric]) for r, m in sorted(self.evals.items())
               if isinstance(m.get(suite, {}).get(metric), (int, float))]
        return [r for r, _ in pts], [float(v) for _, v in pts]

    def metrics(self) -> dict[str, list[str]]:
        """suite -> its metric names, in the order they first appear. A suite with no metric in any round yet
        (a win rate against the previous round, after round 0) is left out."""
        out: dict[str, list[str]] = {}
        for _, suites in sorted(self.evals.items()):
            for suite, values in suites.items():
                names = out.setdefault(suite, [])
                names += [k for k in values if k not in names]
        return {suite: names for suite, names in out.items() if names}


def collect(run_dir: str | Path) -> RunData:
    root = Path(run_dir).expanduser().resolve()
    manifest = root / "manifest.json"
    if not manifest.is_file():
        raise PosttrainError(f"{root} has no manifest.json: not a posttrain run directory (or no stage finished)")
    stages: dict[int, dict[str, dict]] = {}
    for e in json.loads(manifest.read_text())["stages"]:
        stages.setdefault(e["round"], {})[e["stage"]] = e
    data = RunData(root=root, rounds=sorted(stages), stages=stages)
    for r, by_stage in stages.items():
        if "eval" in by_stage:
            e = by_stage["eval"]
            data.evals[r] = json.loads((root / e["outputs"].get("metrics", f"{e['dir']}/metrics.json")).read_text())
    return data


def fmt(v) -> str:
    """A metric as the report prints it: 4 significant digits, `-` for none."""
    if v is None or isinstance(v, str):
        return "-" if v is None else v
    if isinstance(v, bool) or isinstance(v, int):
        return str(int(v))
    return "nan" if math.isnan(v) else f"{v:.4g}"


def _win_cell(suites: dict, suite: str, metric: str) -> str:
    values = suites.get(suite, {})
    cell = fmt(values.get(metric))
    base = metric[: -len("win_rate")]
    if metric.endswith("win_rate") and values.get(f"{base}ci_low") is not None:
        cell += f" [{fmt(values[f'{base}ci_low'])}, {fmt(values[f'{base}ci_high'])}]"
    return cell


def key_columns(data: RunData) -> list[tuple[str, str]]:
    return [(s, m) for s, names in data.metrics().items() for m in names if m.split(".")[-1] in KEY_METRICS]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _rows_counts(entry: dict) -> dict[str, int]:
    rows = entry["rows"]
    return {entry["stage"]: rows} if isinstance(rows, int) else {f"{entry['stage']}.{k}": v for k, v in rows.items()}


def _responses(data: RunData, r: int) -> list[dict] | None:
    e = data.stages.get(r, {}).get("eval")
    path = data.root / e["outputs"]["responses"] if e and "responses" in e["outputs"] else None
    if path is None or not path.exists():
        return None
    import datasets

    return datasets.load_from_disk(str(path)).to_list()


# ---- plots -------------------------------------------------------------------------------------------------


def _grid(n: int, width: float = 3.4, height: float = 2.5, title: str = ""):
    from matplotlib.figure import Figure

    cols = min(4, n)
    rows = math.ceil(n / cols)
    head = 0.45 + 0.2 * (title.count("\n") + 1)  # inches above the panels for the title lines
    w, h = width * cols, height * rows + head
    fig = Figure(figsize=(w, h))
    # Fixed margins in inches: constrained layout doubles the drawing time of a many-panel figure.
    fig.subplots_adjust(left=0.75 / w, right=1 - 0.15 / w, bottom=0.45 / h, top=1 - head / h, wspace=0.35 * 3.4 / width,
                        hspace=0.55 * 2.5 / height)
    fig.suptitle(title, fontsize=10)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _save(fig, path: Path, record: dict) -> None:
    """Save the figure and record the x/y of its labelled lines, as matplotlib holds them."""
    panels = {}
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        lines = {ln.get_label(): {"x": [float(x) for x in ln.get_xdata()], "y": [float(y) for y in ln.get_ydata()]}
                 for ln in ax.get_lines() if not ln.get_label().startswith("_")}
        if lines:
            panels[ax.get_title()] = lines
    fig.savefig(path, dpi=100)
    record[path.name] = panels


def _round_axis(ax, rounds: list[int]) -> None:
    ax.set_xticks(rounds)
    if rounds:
        ax.set_xlim(min(rounds) - 0.4, max(rounds) + 0.4)
    ax.grid(alpha=0.3)


# Metrics that share a panel with their siblings (same name up to the last dot): levels on one scale, and counts.
LEVELS = ("mean", "p10", "p25", "p50", "p75", "p90", "median", "win_rate", "ci_low", "ci_high")
COUNTS = ("count", "n", "none", "quarantined", "unscored", "wins", "ties", "losses")
# Shares, drawn on a 0-1 axis so that a flat line reads as its value.
RATES = ("win_rate", "accuracy", "fully_correct", "refusal_rate", "truncated_rate", "empty_rate", "distinct_1",
         "distinct_2", "acc", "acc_norm", "exact_match", "prompt_level", "instruction_level")


def suite_panels(names: list[str]) -> dict[str, list[str]]:
    """Panel title -> the metrics drawn in it: a metric's level statistics (mean, percentiles, a win rate and its
    interval) share one panel, its counts another (placed last); any other metric has a panel of its own.

    >>> suite_panels(["rm.mean", "rm.p90", "rm.count", "rm.none", "rm.std", "mean_tokens"])
    {'rm': ['rm.mean', 'rm.p90'], 'rm.std': ['rm.std'], 'mean_tokens': ['mean_tokens'], \
'rm (counts)': ['rm.count', 'rm.none']}
    """
    panels: dict[str, list[str]] = {}
    for name in names:
        prefix, _, last = name.rpartition(".")
        if last in LEVELS:
            title = prefix or last
        elif last in COUNTS:
            title = f"{prefix} (counts)" if prefix else "counts"
        else:
            title = name
        panels.setdefault(title, []).append(name)
    return dict(sorted(panels.items(), key=lambda kv: kv[0] == "counts" or kv[0].endswith("(counts)")))  # counts last


def plot_suite(data: RunData, suite: str, names: list[str], path: Path, record: dict) -> None:
    panels = suite_panels(names)
    fig, axes = _grid(len(panels), title=f"eval suite '{suite}' by round (round 0: the starting policy)")
    for ax, (title, metrics) in zip(axes, panels.items()):
        for metric in metrics:
            x, y = data.series(suite, metric)
            last = metric.rpartition(".")[2]
            style = dict(ls=":", lw=1, marker=".") if last in ("ci_low", "ci_high") else dict(marker="o")
            ax.plot(x, y, label=metric, **style)
            if last == "win_rate":
                base = metric[: -len("win_rate")]
                (lx, low), (hx, high) = data.series(suite, f"{base}ci_low"), data.series(suite, f"{base}ci_high")
                if lx == x == hx:
                    ax.fill_between(x, low, high, alpha=0.15)
                ax.axhline(0.5, color="grey", ls="--", lw=1)
            if last in RATES and all(0 <= v <= 1 for v in y):
                ax.set_ylim(-0.05, 1.05)
        if not any(len(ln.get_xdata()) for ln in ax.get_lines()):
            ax.text(0.5, 0.5, "no value in any round\n(undefined, e.g. constant lengths)", transform=ax.transAxes,
                    ha="center", va="center", color="grey", fontsize=8)
        if len(metrics) > 1:
            lines = [ln for ln in ax.get_lines() if ln.get_label() in metrics]
            ax.legend(lines, [ln.get_label().rpartition(".")[2] for ln in lines], fontsize=7)
        ax.set_title(title, fontsize=9)
        _round_axis(ax, sorted(data.evals))
    _save(fig, path, record)


def plot_reward_distributions(data: RunData, answers: dict[int, list[dict]], path: Path, record: dict) -> bool:
    columns = sorted({k for rows in answers.values() for k in rows[0] if k.startswith("reward.")}) if answers else []
    if not columns:
        return False
    fig, axes = _grid(len(columns), 4.5, 3.2, "held-out reward by round\n(box: quartiles, whiskers 1.5 IQR; "
                                                   "line: mean)")
    for ax, col in zip(axes, columns):
        rounds = [r for r in sorted(answers) if col in answers[r][0]]
        values = [[v for v in (row[col] for row in answers[r]) if v is not None] for r in rounds]
        rounds, values = zip(*[(r, v) for r, v in zip(rounds, values) if v]) if any(values) else ((), ())
        ax.boxplot(values, positions=rounds, widths=0.5)
        ax.plot(rounds, [sum(v) / len(v) for v in values], "D-", ms=4, label="mean")
        ax.set_title(col.removeprefix("reward."), fontsize=10)
        ax.set_ylabel("score on held-out answers")
        _round_axis(ax, list(rounds))
    _save(fig, path, record)
    return True


def plot_length_drift(data: RunData, answers: dict[int, list[dict]], path: Path, record: dict) -> bool:
    gen = {r: s["generate"]["metrics"]["mean_completion_tokens"] for r, s in data.stages.items()
           if "generate" in s and "mean_completion_tokens" in s["generate"].get("metrics", {})}
    if not answers and not gen:
        return False
    reward = next((k for rows in answers.values() for k in rows[0] if k.startswith("reward.")), None)
    fig, axes = _grid(2 if reward else 1, 5, 3.4, "length drift (round 0: the starting policy)")
    ax = axes[0]
    rounds = sorted(answers)
    lengths = [[row["completion_tokens"] for row in answers[r]] for r in rounds]
    if rounds:
        ax.boxplot(lengths, positions=rounds, widths=0.5)
        ax.plot(rounds, [sum(v) / len(v) for v in lengths], "o-", label="held-out answers (mean)")
    if gen:
        ax.plot(sorted(gen), [gen[r] for r in sorted(gen)], "s--", label="training generations (mean)")
    ax.set_title("answer length (tokens)", fontsize=10)
    ax.legend(fontsize=8)
    _round_axis(ax, sorted(set(rounds) | set(gen)))
    if reward:
        ax = axes[1]
        for r in rounds:
            pts = [(row["completion_tokens"], row[reward]) for row in answers[r] if row.get(reward) is not None]
            if pts:
                ax.scatter(*zip(*pts), s=12, alpha=0.6, label=f"round {r}")
        ax.set_title(f"{reward.removeprefix('reward.')} vs length", fontsize=10)
        ax.set_xlabel("answer tokens")
        ax.set_ylabel("score")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    _save(fig, path, record)
    return True


def _train_rewards(data: RunData) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for r, s in sorted(data.stages.items()):
        for name, summary in s.get("score", {}).get("metrics", {}).get("rewards", {}).items():
            out.setdefault(name, {})[r] = summary
    return out


def plot_train_rewards(train: dict[str, dict[int, dict]], path: Path, record: dict) -> bool:
    if not train:
        return False
    fig, axes = _grid(len(train), 4, 3, "rewards of the training generations (score stage)")
    for ax, (name, by_round) in zip(axes, train.items()):
        rounds = [r for r in sorted(by_round) if by_round[r].get("mean") is not None]
        ax.plot(rounds, [by_round[r]["mean"] for r in rounds], "o-", label="mean")
        if all("p10" in by_round[r] for r in rounds):
            ax.fill_between(rounds, [by_round[r]["p10"] for r in rounds], [by_round[r]["p90"] for r in rounds],
                            alpha=0.2, label="p10-p90")
        ax.legend(fontsize=7)
        ax.set_title(name, fontsize=10)
        _round_axis(ax, rounds)
    _save(fig, path, record)
    return True


# ---- report ------------------------------------------------------------------------------------------------


def build_report(run_dir: str | Path) -> Path:
    """Rewrite `run_dir/report.md` and `run_dir/plots/` from the run directory. Returns the report's path."""
    data = collect(run_dir)
    plots = data.root / "plots"
    plots.mkdir(exist_ok=True)
    record: dict = {}
    answers = {r: rows for r in sorted(data.evals) if (rows := _responses(data, r))}
    suites = data.metrics()
    for suite, names in suites.items():
        plot_suite(data, suite, names, plots / f"eval_{suite}.png", record)
    plot_reward_distributions(data, answers, plots / "reward_distributions.png", record)
    plot_length_drift(data, answers, plots / "length_drift.png", record)
    train = _train_rewards(data)
    plot_train_rewards(train, plots / "train_rewards.png", record)
    for stale in plots.glob("*.png"):  # a suite dropped from the recipe leaves no old plot behind
        if stale.name not in record:
            stale.unlink()
    (plots / "data.json").write_text(json.dumps(record, indent=1))

    md = [f"# Run report: {data.root.name}", "",
          f"Run directory `{data.root}`; rounds {data.rounds[0]}..{data.rounds[-1]} "
          f"(round 0 evaluates the starting policy). Rebuild with `posttrain-report {data.root}`.", ""]
    keys = key_columns(data)
    if data.evals:
        md += ["## Summary (held-out eval)", "",
               _table(["round", "policy", *[f"{s}.{m}" for s, m in keys]],
                      [[str(r), f"`{data.stages[r]['eval']['inputs'].get('policy', '?')}`",
                        *[_win_cell(m, s, k) for s, k in keys]] for r, m in sorted(data.evals.items())]), ""]
        judges = {suite: reward for r in data.rounds if "eval" in data.stages[r]
                  for suite, reward in data.stages[r]["eval"].get("metrics", {}).get("judged_by", {}).items()}
        md += [f"Win rates in `{suite}` are judged by the reward `{reward}`." for suite, reward in judges.items()]
        md += [""] if judges else []
    counts = {r: {k: v for e in s.values() for k, v in _rows_counts(e).items()} for r, s in data.stages.items()}
    cols = list(dict.fromkeys(k for r in data.rounds for k in counts[r]))
    md += ["## Data per round (rows each stage wrote)", "",
           _table(["round", *cols, "seconds"],
                  [[str(r), *[fmt(counts[r].get(c)) for c in cols],
                    fmt(sum(e["seconds"] for e in data.stages[r].values()))] for r in data.rounds]), ""]
    filters = {r: e["metrics"].get("filters", {}) for r in data.rounds if (e := data.stages[r].get("filter"))}
    if filters:  # how many rows each filter removed, and why (Llama 3 tracks its data by quality and topic)
        names = list(dict.fromkeys(f for per in filters.values() for f in per))
        reasons = sorted({(f, why) for per in filters.values() for f, m in per.items() for why in m.get("reasons", {})})
        rows = [[str(r), *[fmt(per.get(f, {}).get("removed")) for f in names],
                 *[fmt(per.get(f, {}).get("reasons", {}).get(why, 0)) for f, why in reasons]]
                for r, per in filters.items()]
        md += ["## Rows removed by the filters (kept for inspection in round_N/03_filter/removed)", "",
               _table(["round", *[f"{f} removed" for f in names], *[f"{f}: {why}" for f, why in reasons]], rows), ""]
    if train:
        md += ["## Training generations' rewards (score stage)", "", "![train rewards](plots/train_rewards.png)", ""]
        stats = ["mean", "p10", "p50", "p90", "none"]
        md += [_table(["round", *[f"{n}.{s}" for n in train for s in stats]],
                      [[str(r), *[fmt(train[n].get(r, {}).get(s)) for n in train for s in stats]]
                       for r in sorted({r for v in train.values() for r in v})]), ""]
    eval_rounds = sorted(data.evals)
    for suite, names in suites.items():
        md += [f"## Eval suite `{suite}`", "", f"![{suite}](plots/eval_{suite}.png)", "",
               _table(["metric", *[f"round {r}" for r in eval_rounds]],
                      [[m, *[fmt(data.evals[r].get(suite, {}).get(m)) for r in eval_rounds]] for m in names]), ""]
    for name, title in (("reward_distributions.png", "Reward distributions"), ("length_drift.png", "Length drift")):
        if name in record:
            md += [f"## {title}", "", f"![{title}](plots/{name})", ""]
    path = data.root / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text("\n".join(md))
    os.replace(tmp, path)
    return path


def terminal_table(run_dir: str | Path) -> str:
    """The key eval metrics (rows) by round (columns), plus the SFT/DPO data sizes, as plain text."""
    data = collect(run_dir)
    rounds = data.rounds
    rows = [["round", *map(str, rounds)]]
    for s, m in key_columns(data):
        rows.append([f"{s}.{m}", *[_win_cell(data.evals.get(r, {}), s, m) if s in data.evals.get(r, {}) else "-"
                                    for r in rounds]])
    for stage, key in (("select", "sft"), ("select", "pairs")):
        if any(stage in data.stages[r] for r in rounds):
            rows.append([f"{stage}.{key} rows", *[fmt(_rows_counts(data.stages[r][stage]).get(f"{stage}.{key}"))
                                                  if stage in data.stages[r] else "-" for r in rounds]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain-report", description="Rebuild report.md and plots/ of a run.")
    parser.add_argument("run_dir", help="a posttrain run directory (holds manifest.json)")
    args = parser.parse_args(argv)
    try:
        path = build_report(args.run_dir)
        print(terminal_table(args.run_dir))
    except PosttrainError as e:
        print(f"posttrain-report: {e}", file=sys.stderr)
        return 2
    print(f"\nreport: {path}\nplots:  {path.parent / 'plots'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
