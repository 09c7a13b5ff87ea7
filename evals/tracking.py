"""Eval metrics per round to the trackers the training stages report to (`evals.report_to`, by default
`sft.report_to`), so a tracker shows each round's held-out results beside its training curves.

- tensorboard: `<run_dir>/tensorboard/evals/`, one series per metric (`eval/<suite>/<metric>`) with the round as
  its step, so `tensorboard --logdir <run_dir>` draws the rounds as one line next to every stage's own events;
- wandb: a run named `evals` in the run directory's group (the training stages' WANDB_RUN_GROUP, in WANDB_PROJECT
  as transformers uses it), with a stable id resumed by every round, logged at step = round;
- trackio: a run named `evals` in the project named after the run directory, where the training stages log too.

A round's metrics are logged when its eval stage runs; a stage skipped as done earlier logs nothing again.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path


def scalars(metrics: dict) -> dict[str, float]:
    """The eval stage's metrics ({suite: {name: value}}) as flat `eval/<suite>/<name>` -> finite numbers."""
    out = {}
    for suite, values in metrics.items():
        if not isinstance(values, dict) or suite in ("seconds", "judged_by"):
            continue
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"eval/{suite}/{name}"] = float(value)
    return out


def log_eval(report_to: list[str], run_dir: Path, round_idx: int, metrics: dict) -> list[str]:
    """Log one round's eval metrics to each tracker in `report_to` that posttrain logs evals to; returns those
    it logged to."""
    values = scalars(metrics)
    wanted = set(report_to)
    if "all" in wanted:
        from transformers.integrations.integration_utils import get_available_reporting_integrations

        wanted = set(get_available_reporting_integrations())
    done = []
    if "tensorboard" in wanted:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tensorboard" / "evals")) as writer:
            for tag, value in values.items():
                writer.add_scalar(tag, value, global_step=round_idx)
        done.append("tensorboard")
    if "wandb" in wanted:
        import wandb

        group = os.environ.get("WANDB_RUN_GROUP") or run_dir.name
        run_id = "evals-" + hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "huggingface"), group=group, name="evals",
                         id=run_id, resume="allow", job_type="eval")
        run.log(values, step=round_idx)
        run.finish()
        done.append("wandb")
    if "trackio" in wanted:
        import trackio

        trackio.init(project=run_dir.name, name="evals", resume="allow")  # the training stages' project
        trackio.log(values, step=round_idx)
        trackio.finish()
        done.append("trackio")
    return done
