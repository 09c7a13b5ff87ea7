"""The generate stage: this round's prompts, K completions each, saved as a `datasets` folder.

Work is cut into shards of `generate.shard_size` prompts (default: the backend class's `default_shard_size`, 2048
for vLLM and 256 for endpoints, else the backend's `batch_size`, else 8), each written (atomically) as soon as it
is done and seeded by (seed, round, shard index): a stage killed halfway resumes from its finished shards and ends
with exactly the texts an uninterrupted run would have produced. A shard is one backend call: an endpoint backend
keeps `max_concurrency` requests in flight within it, so shards of an endpoint should be several times its
concurrency. Prompts the backend's server refuses for themselves (PromptsRejected) are quarantined with their
`prompt_id` and the reason, counted in the manifest, and the stage goes on. With `generate.teacher_logprobs` = k,
every row also carries the generated token ids and the model's top-k log-probs at each of them
(data_gen/logprobs.py), for token-level distillation.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import datasets
from hydra.utils import get_object
from tqdm.auto import tqdm

from data_gen.backend import PromptsRejected, Sampling, build_backend
from data_gen.logprobs import KD_COLUMNS, kd_features
from data_gen.prompts import load_pools, sample_mix
from posttrain.config import GenerateJob
from posttrain.rundir import Inputs, StageResult, stable_hash, write_text_atomic
from posttrain.timing import Phases

GENERATION_FEATURES = datasets.Features(
    {
        "prompt_id": datasets.Value("string"),
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "meta": datasets.Value("string"),  # JSON: the prompt row's other fields, for rewards
        "sample_idx": datasets.Value("int32"),
        "text": datasets.Value("string"),
        "prompt_tokens": datasets.Value("int32"),
        "completion_tokens": datasets.Value("int32"),
        "finish_reason": datasets.Value("string"),
        "model": datasets.Value("string"),
        "round": datasets.Value("int32"),
    }
)


DEGENERATE_WARNING = 0.25  # a share of identical-K prompts or of empty answers worth a warning


def degenerate_samples(rows: list[dict]) -> dict[str, float]:
    """`identical_k_rate`: the share of prompts (with two or more samples) whose samples are all the same text (a
    greedy or collapsed sampler: nothing to choose from); `empty_rate`: the share of blank answers."""
    by_prompt: dict[str, set[str]] = {}
    sizes: Counter = Counter()
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], set()).add(r["text"].strip())
        sizes[r["prompt_id"]] += 1
    several = [p for p, n in sizes.items() if n > 1]
    return {
        "identical_k_rate": sum(len(by_prompt[p]) == 1 for p in several) / len(several) if several else 0.0,
        "empty_rate": sum(not r["text"].strip() for r in rows) / len(rows) if rows else 0.0,
    }


def shard_size(cfg) -> int:
    """Prompts per shard: `generate.shard_size`, else the backend class's `default_shard_size` (engines and
    endpoints that schedule their own batches), else the backend's `batch_size`, else 8. Only hashed settings
    decide it, so a rerun cuts the same shards."""
    if cfg.shard_size:
        return cfg.shard_size
    default = getattr(get_object(cfg.backend["_target_"]), "default_shard_size", None)
    return default or cfg.backend.get("batch_size") or 8


def _concatenate(shards: list[Path], features: datasets.Features, scratch: Path) -> datasets.Dataset:
    """The JSONL shards as one dataset, one shard in memory at a time: each is written as Arrow under `scratch`,
    and the memory-mapped parts are concatenated (the teacher's log-probs make rows ~30x larger as Python
    objects than in Arrow)."""
    shutil.rmtree(scratch, ignore_errors=True)
    parts = []
    for i, shard in enumerate(shards):
        rows = [json.loads(line) for line in open(shard)]
        if rows:
            datasets.Dataset.from_list(rows, features=features).save_to_disk(str(scratch / f"{i:05d}"))
            parts.append(datasets.load_from_disk(str(scratch / f"{i:05d}")))
    if not parts:
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.concatenate_datasets(parts)


def _write_lines(path: Path, rows: list[dict]) -> None:
    """JSON lines written atomically."""
    write_text_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def generate(job: GenerateJob, inputs: Inputs, out: Path) -> StageResult:
    """Stage function. `job`: the round's `generate` section (k, sampling, the backend's `_target_` config), the
    `data` section, round, seed and `prompt_start` (where this round starts reading the prompt stream: the
    prompts drawn by earlier rounds); `inputs`: `prompts` (the local paths of `data.prompts`' sources, for the
    run directory's fingerprints) and `model` (the spec of the model
    that generates). Writes `generations/` (one row per completion) and, when rows were set aside,
    `quarantine.jsonl`."""
    cfg, data = job.generate, job.data
    pools = load_pools(data.prompts, on_empty=data.on_empty, split=data.split)
    prompts = sample_mix([pool for _, pool in pools], [s.weight for s, _ in pools], data.num_prompts,
                         job.prompt_start, job.seed)
    set_aside = [q for _, pool in pools for q in pool.quarantined]

    features = GENERATION_FEATURES.copy()
    if cfg.teacher_logprobs:
        features.update(kd_features())
    shard_dir = out / "shards"
    shard_dir.mkdir(exist_ok=True)
    size = shard_size(cfg)
    todo = [i for i in range(0, len(prompts), size) if not (shard_dir / f"{i // size:05d}.jsonl").exists()]
    backend = None
    bar = tqdm(total=len(prompts), desc=f"round {job.round} generate", unit="prompt")
    bar.update(len(prompts) - sum(len(prompts[i : i + size]) for i in todo))
    phases = Phases()
    for start in todo:
        if backend is None:  # load the model only when there is work left
            with phases("load"):
                backend = build_backend(cfg.backend, inputs["model"], journal_dir=str(out / "journal"))
        batch = prompts[start : start + size]
        sampling = Sampling(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=int(stable_hash([job.seed, job.round, start // size]), 16) % (2**31),
            top_logprobs=cfg.teacher_logprobs,
        )
        path = shard_dir / f"{start // size:05d}.jsonl"
        path.with_suffix(".rejected").unlink(missing_ok=True)  # from an attempt cut short: this one decides
        try:
            with phases("generate"):
                completions = backend.generate([p["messages"] for p in batch], cfg.k, sampling)
        except PromptsRejected as e:
            completions = e.results
            _write_lines(path.with_suffix(".rejected"), [
                {"where": f"round {job.round} generate", "prompt_id": batch[i]["prompt_id"],
                 "reason": f"rejected by the backend: {why}"} for i, why in sorted(e.rejected.items())])
        rows = []
        for p, samples in zip(batch, completions):
            for j, c in enumerate(samples or []):
                if cfg.teacher_logprobs and not all(col in c for col in KD_COLUMNS):
                    raise RuntimeError(f"generate.teacher_logprobs={cfg.teacher_logprobs}, but "
                                       f"{cfg.backend['_target_']} returned no top-k log-probs (a sample lacks "
                                       f"{[col for col in KD_COLUMNS if col not in c]})")
                c = {key: value for key, value in c.items() if key in features}
                rows.append({
                    "prompt_id": p["prompt_id"],
                    "messages": p["messages"],
                    "meta": json.dumps(p["meta"], sort_keys=True, default=str),
                    "sample_idx": j,
                    **c,
                    "model": c.get("model") or inputs["model"],  # the name a server answered with, if any
                    "round": job.round,
                })
        _write_lines(path, rows)
        bar.update(len(batch))
    bar.close()

    rejected = [json.loads(line) for s in sorted(shard_dir.glob("*.rejected")) for line in open(s)]
    if set_aside or rejected:  # written whole, so a rerun after a crash here writes no line twice
        _write_lines(out / "quarantine.jsonl", set_aside + rejected)
    if rejected:
        print(f"posttrain: warning: round {job.round} generate: {len(rejected)} prompts rejected by the backend, "
              f"quarantined (quarantine.jsonl); first: {rejected[0]['prompt_id']}: {rejected[0]['reason'][:200]}",
              file=sys.stderr)
    with phases("save"):
        generations = _concatenate(sorted(shard_dir.glob("*.jsonl")), features, out / "arrow")
        generations.save_to_disk(str(out / "generations"))
        del generations
    shutil.rmtree(out / "arrow", ignore_errors=True)
    shutil.rmtree(shard_dir)
    shutil.rmtree(out / "journal", ignore_errors=True)
    # the columns the metrics read, not the teacher's log-probs
    saved = datasets.load_from_disk(str(out / "generations"))
    rows = saved.select_columns(["prompt_id", "text", "finish_reason", "completion_tokens"]).to_list()
    if cfg.teacher_logprobs:  # Arrow's list lengths: the log-probs are not read into Python
        import pyarrow.compute as pc

        with_logprobs = int(pc.sum(pc.list_value_length(saved.data.table.column("topk_ids"))).as_py() or 0)
    finish = Counter(r["finish_reason"] for r in rows)
    degenerate = degenerate_samples(rows)
    for what, share in degenerate.items():
        if share > DEGENERATE_WARNING:
            print(f"posttrain: warning: round {job.round} generate: {share:.0%} of "
                  f"{'prompts have all K samples identical' if what == 'identical_k_rate' else 'answers are empty'}"
                  f" ({what} in the manifest): best-of-K and DPO pairs learn little from them", file=sys.stderr)
    return StageResult(
        outputs={"generations": "generations"},
        rows=len(rows),
        metrics={
            "prompts": len(prompts),
            "quarantined": {"empty_prompt": len(set_aside), "rejected_by_backend": len(rejected)},
            "finish_reason": dict(sorted(finish.items())),
            "mean_completion_tokens": sum(r["completion_tokens"] for r in rows) / max(len(rows), 1),
            "seconds": phases.seconds(),  # this attempt's; a resumed stage's earlier shards are not in it
            **({"teacher_logprobs": {"k": cfg.teacher_logprobs, "tokens": with_logprobs}}
               if cfg.teacher_logprobs else {}),
            **degenerate,
            **({"backend": backend.stats()} if hasattr(backend, "stats") else {}),
        },
    )
