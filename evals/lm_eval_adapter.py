"""lm-evaluation-harness as an eval suite: named lm-eval tasks on the round's checkpoint, scores into metrics.json.

Needs the optional extra: `pip install 'posttrain[eval]'`. Tasks are lm-eval's own (hellaswag, gsm8k, ...; they
download their data) or your YAML task files in `include_path`, which may read local data (`dataset_path: json`
with `dataset_kwargs: {data_files: ...}`) and so run offline:

    evals:
      suites:
        harness:
          _target_: evals.lm_eval_adapter.LMEvalSuite
          tasks: [my_task]
          include_path: /path/to/my/tasks
          limit: 200
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from posttrain.errors import PosttrainError

INSTALL_HINT = "pip install 'posttrain[eval]' (lm-eval>=0.4.13)"


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def flatten_results(results: dict, n_samples: dict | None = None) -> dict[str, float]:
    """lm-eval's `results` ({task: {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}}) as flat numeric
    metrics `<task>.<metric>` (`<task>.<metric>_<filter>` for a filter other than "none"), plus `<task>.n`, the
    number of documents scored.

    >>> flatten_results({"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "em,strict": 1.0}})
    {'t.acc': 0.5, 't.em_strict': 1.0}
    """
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            out[f"{task}.{metric}" if filt == "none" else f"{task}.{metric}_{filt}"] = float(value)
        if n_samples and task in n_samples:
            out[f"{task}.n"] = n_samples[task].get("effective", n_samples[task].get("original"))
    return out


class LMEvalSuite:
    """Run lm-eval tasks (`lm_eval.simple_evaluate`, model "hf") on the policy checkpoint of this round.

    `tasks`: lm-eval task or group names; `include_path`: a folder (or pkg:// spec) of extra task YAMLs;
    `include_defaults`: also index lm-eval's built-in tasks (slow to index: turn off when all tasks are local);
    `limit`: documents per task; `num_fewshot`, `batch_size`, `apply_chat_template`: as in lm-eval; `device`:
    "auto" picks cuda when present; `dtype`: the checkpoint's dtype for loading. The full lm-eval results
    (without per-sample logs) are kept in `<suite>/results.json`.
    """

    def __init__(
        self,
        tasks: list[str],
        include_path: str | None = None,
        include_defaults: bool = True,
        limit: int | float | None = None,
        num_fewshot: int | None = None,
        batch_size: int | str = 8,
        apply_chat_template: bool = False,
        device: str = "auto",
        dtype: str = "auto",
    ):
        if not lm_eval_available():
            raise PosttrainError(f"eval suite LMEvalSuite needs lm-evaluation-harness, which is not installed: "
                                 f"{INSTALL_HINT}")
        if not tasks:
            raise PosttrainError("LMEvalSuite.tasks: name at least one lm-eval task")
        self.tasks, self.include_path, self.include_defaults = list(tasks), include_path, include_defaults
        self.limit, self.num_fewshot, self.batch_size = limit, num_fewshot, batch_size
        self.apply_chat_template, self.device, self.dtype = apply_chat_template, device, dtype

    def __call__(self, ctx) -> dict:
        import lm_eval
        import torch
        from lm_eval.tasks import TaskManager

        from posttrain.models import resolve_model, resolve_path

        include = str(resolve_path(self.include_path)) if self.include_path else None
        manager = TaskManager(include_path=include, include_defaults=self.include_defaults)
        # Before the checkpoint loads: a misspelt task should cost nothing.
        unknown = [t for t in self.tasks if t not in manager.all_tasks and not Path(t).exists()]
        if unknown:
            raise PosttrainError(f"eval suite {ctx.suite!r}: lm-eval knows no task {unknown} (include_path "
                                 f"{include}, include_defaults {self.include_defaults})")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        try:
            result = lm_eval.simple_evaluate(
                model="hf",
                model_args={"pretrained": resolve_model(ctx.policy), "dtype": self.dtype},
                tasks=self.tasks,
                task_manager=manager,
                num_fewshot=self.num_fewshot,
                batch_size=self.batch_size,
                device=device,
                limit=self.limit,
                apply_chat_template=self.apply_chat_template,
                log_samples=False,
            )
        except KeyError as e:  # lm-eval's way of saying a task name is unknown
            raise PosttrainError(f"eval suite {ctx.suite!r}: lm-eval does not know task {e} (tasks {self.tasks}, "
                                 f"include_path {include})") from None
        if result is None:  # lm-eval returns None on non-zero ranks
            return {}
        folder = ctx.out / ctx.suite
        folder.mkdir(parents=True, exist_ok=True)
        kept = {k: result[k] for k in ("results", "configs", "versions", "n-shot", "n-samples") if k in result}
        (folder / "results.json").write_text(json.dumps(kept, indent=2, default=str))
        return flatten_results(result["results"], result.get("n-samples"))
