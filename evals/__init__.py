"""Per-round evaluation on held-out prompts (`evals.stage`), its suites (`evals.suites`, `evals.lm_eval_adapter`)
and the run report (`evals.report`, the `posttrain-report` command)."""
