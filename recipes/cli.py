"""The `posttrain` command: Hydra composes the recipe, the loop runs it. Hydra lives here only.

    posttrain                                        # the default recipe
    posttrain experiment=tiny round=3 run_dir=/tmp/r # the tiny recipe, up to round 3
    posttrain --config-dir ./my_recipes experiment=mine
    posttrain -m experiment=tiny sft.learning_rate=1e-4,3e-4   # one run directory per job

In a multirun each job gets its own run directory, `<run_dir>/<overrides>`, so jobs never share stages.
"""

from __future__ import annotations

import sys
import tempfile

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from posttrain.config import register
from posttrain.errors import PosttrainError

register()
# Hydra's own log folder: inside the run directory, except for a dry run, which writes nothing there.
OmegaConf.register_new_resolver(
    "posttrain_logs",
    lambda run_dir, dry_run, now: (
        f"{tempfile.gettempdir()}/posttrain-dry-run/{now}" if dry_run else f"{run_dir}/logs/{now}"),
    replace=True,
)


@hydra.main(version_base="1.3", config_path="pkg://recipes", config_name="config")
def main(cfg: DictConfig) -> None:
    from recipes.loop import run  # heavy imports after composition, so `--cfg job` and errors are quick

    run_dir = cfg.run_dir
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        run_dir = f"{run_dir}/{hc.job.override_dirname or hc.job.num}"
    try:
        run(cfg, run_dir=run_dir)
    except PosttrainError as e:
        print(f"posttrain: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
