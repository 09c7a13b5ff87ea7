"""The `posttrain` command: Hydra composes the recipe, the loop runs it. Hydra lives here only.

    posttrain                                        # the default recipe
    posttrain experiment=tiny round=3 run_dir=/tmp/r # the tiny recipe, up to round 3
    posttrain --config-dir ./my_recipes experiment=mine
    posttrain -m experiment=tiny sft.learning_rate=1e-4,3e-4   # one run directory per job

In a multirun each job gets its own run directory, `<run_dir>/<overrides>`, so jobs never share stages.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import traceback

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from posttrain.config import register
from posttrain.errors import PosttrainError
from posttrain.rundir import StageError

register()


def refuse_hydra_hooks() -> None:
    """Check what Hydra itself would run from a recipe before it runs it: `hydra.callbacks` (posttrain uses none)
    and logging configs whose handlers, formatters or filters are built by a `()` factory or are not classes of
    the `logging` package. Both run before posttrain's own validation, even for a dry run, and could run any code.
    A recipe is code: the allowlist stops mistakes and recipes copied from others from running arbitrary callables;
    it is not a sandbox for hostile Python."""
    import hydra._internal.hydra as hydra_runner
    import hydra.core.utils as hydra_utils
    from hydra._internal.callbacks import Callbacks

    class CheckedCallbacks(Callbacks):
        def __init__(self, config=None) -> None:
            hooks = OmegaConf.select(config, "hydra.callbacks") if config is not None else None
            if hooks:  # Hydra would report an exception with its traceback: end with posttrain's one line instead
                fail(f"hydra.callbacks: {sorted(hooks)} would run before posttrain checks the recipe; posttrain "
                     f"runs no Hydra callbacks (remove them from the recipe)")
            super().__init__(config)

    def checked_configure_log(log_config, verbose_config=False):
        if log_config is not None:
            problems = _logging_problems(OmegaConf.to_container(log_config, resolve=False))
            if problems:
                fail("hydra logging config: " + "; ".join(problems))
        return original_configure_log(log_config, verbose_config)

    original_configure_log = hydra_utils.configure_log
    hydra_runner.Callbacks = CheckedCallbacks
    hydra_runner.configure_log = hydra_utils.configure_log = checked_configure_log


def _logging_problems(node, path: str = "") -> list[str]:
    problems = []
    if isinstance(node, dict):
        for k, v in node.items():
            where = f"{path}.{k}" if path else str(k)
            if k == "()":
                problems.append(f"{where}: a factory ({v!r}) would be called; use `class: logging....`")
            elif k == "class" and not str(v).startswith("logging."):
                problems.append(f"{where}: {v!r} is not a class of the logging package")
            else:
                problems += _logging_problems(v, where)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            problems += _logging_problems(v, f"{path}[{i}]")
    return problems


# Groups whose files hold settings for the whole recipe (their own name is not a key of it).
GLOBAL_GROUPS = ("experiment", "debug", "rehearsal", "train")
# Keys that map names to configs: written as lists, Hydra only says it cannot merge a ListConfig.
MAPPINGS = ("reward.rewards", "filter.filters", "evals.rewards", "evals.suites", "backend_swaps")


def explain_hydra_error(error: BaseException) -> str | None:
    """What to write instead, for the Hydra mistakes recipes make most; None for any other error."""
    text = " ".join(str(e) for e in (error, error.__cause__) if e is not None)
    for group in GLOBAL_GROUPS:
        if f"Key '{group}' not in 'PosttrainConfig'" in text:
            return (f"a recipe of the `{group}` group put its keys under `{group}.`: make `# @package _global_` the "
                    f"first line of that file (every file in recipes/{group}/ starts with it), so its keys apply to "
                    f"the whole recipe")
    if "ListConfig" in text and ("Cannot merge DictConfig with ListConfig" in text or "Dict[str, Any]" in text):
        key = next((k for k in MAPPINGS if f"full_key: {k}" in text), None)
        where = f"{key} is" if key else f"one of {', '.join(MAPPINGS)} is"
        return (f"{where} given as a list, but it maps names to configs: write `rewards: {{brevity: {{_target_: "
                f"reward.verifiers.LengthPenalty, target_words: 8}}}}`, not `rewards: [{{_target_: ...}}]` "
                f"(on the command line: 'reward.rewards={{brevity: {{_target_: ...}}}}')")
    return None


def explain_hydra_errors() -> None:
    """Hydra composes the recipe before posttrain sees it, and reports its own errors: the mistakes
    `explain_hydra_error` knows end in posttrain's one line with the fix instead."""
    import hydra._internal.utils as hydra_utils

    original = hydra_utils.run_and_report

    def run_and_report(func):
        def explained():
            try:
                return func()
            except Exception as e:  # noqa: BLE001 - re-raised unless it is a mistake with a known fix
                hint = explain_hydra_error(e)
                if hint is None:
                    raise
                fail(hint)

        return original(explained)

    hydra_utils.run_and_report = run_and_report


refuse_hydra_hooks()
explain_hydra_errors()
# A multirun's sweep folder, where Hydra saves its multirun.yaml (the composed config, keys and all): a private
# (0700) temporary folder, made once per process, never inside a run directory.
OmegaConf.register_new_resolver("posttrain_scratch", functools.cache(lambda: tempfile.mkdtemp(prefix="posttrain-")),
                                replace=True)


@hydra.main(version_base="1.3", config_path="pkg://recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from recipes.loop import run  # heavy imports after composition, so `--cfg job` and errors are quick

    run_dir = cfg.run_dir
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        run_dir = f"{run_dir}/{hc.job.override_dirname or hc.job.num}"
    try:
        run(cfg, run_dir=run_dir, overrides=list(hc.overrides.task))
    except StageError as e:  # the stage and the cause first; the log's last lines and the traceback's place before
        first, _, details = str(e).partition("\n")
        if details:
            print(details, file=sys.stderr)
        fail(first)
    except PosttrainError as e:  # an invalid recipe (its problems listed), a changed stage, a locked run directory
        fail(str(e))
    except Exception as e:  # noqa: BLE001 - outside any stage (the report, the lock...): still one closing line
        traceback.print_exc()
        fail(f"{type(e).__name__}: {e}")


def fail(message: str) -> None:
    print(f"posttrain: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
