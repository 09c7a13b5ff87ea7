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
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import datasets
from hydra.utils import get_object

from data_gen.backend import PromptsRejected, Sampling, build_backend
from data_gen.logprobs import KD_COLUMNS, kd_features
from data_gen.prompts import load_pools, sample_mix
from posttrain.config import GenerateJob
from posttrain.rundir import Inputs, StageResult, stable_hash, write_text_atomic
from posttrain.shards import Shards, iter_columns, publish, run_ranks
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


def degenerate_samples(rows: Iterable[dict]) -> dict[str, float]:
    """`identical_k_rate`: the share of prompts (with two or more samples) whose samples are all the same text (a
    greedy or collapsed sampler: nothing to choose from); `empty_rate`: the share of blank answers. Keeps a hash
    per distinct text of a prompt, not the texts."""
    by_prompt: dict[str, set[int]] = {}
    sizes: Counter = Counter()
    empty = total = 0
    for r in rows:
        text = r["text"].strip()
        by_prompt.setdefault(r["prompt_id"], set()).add(hash(text))
        sizes[r["prompt_id"]] += 1
        empty += not text
        total += 1
    several = [p for p, n in sizes.items() if n > 1]
    return {
        "identical_k_rate": sum(len(by_prompt[p]) == 1 for p in several) / len(several) if several else 0.0,
        "empty_rate": empty / total if total else 0.0,
    }


def shard_size(cfg) -> int:
    """Prompts per shard: `generate.shard_size`, else the backend class's `default_shard_size` (engines and
    endpoints that schedule their own batches), else the backend's `batch_size`, else 8. Only hashed settings
    decide it, so a rerun cuts the same shards."""
    if cfg.shard_size:
        return cfg.shard_size
    default = getattr(get_object(cfg.backend["_target_"]), "default_shard_size", None)
    return default or cfg.backend.get("batch_size") or 8


def _write_lines(path: Path, rows: list[dict]) -> None:
    """JSON lines written atomically."""
    write_text_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def generate_shards(settings: dict, rank: int, world: int) -> None:
    """One rank's part of the stage (posttrain.shards.run_ranks): load the backend once if any of its shards is
    left, generate each shard with its own seed and write it. `settings`: what `generate` froze (plain values)."""
    out = Path(settings["out"])
    prompts = [json.loads(line) for line in open(out / "prompts.jsonl")]
    size, k, logprobs = settings["shard_size"], settings["k"], settings["teacher_logprobs"]
    features = _features(logprobs)
    shards = Shards(out, -(-len(prompts) // size), rank, world, desc=f"round {settings['round']} generate",
                    attempt=settings["attempt"])
    todo = shards.todo()
    backend = None
    for i in todo:
        started, phases = time.perf_counter(), Phases()  # this shard's seconds
        if backend is None:  # load the model only when there is work left
            with phases("load"):
                journal = out / "journal" if world == 1 else out / "journal" / f"rank_{rank}"
                backend = build_backend(_backend_config(settings["backend"], logprobs), settings["model"],
                                        journal_dir=str(journal))
        batch = prompts[i * size : (i + 1) * size]
        sampling = Sampling(**settings["sampling"], top_logprobs=logprobs,
                            seed=int(stable_hash([settings["seed"], settings["round"], i]), 16) % (2**31))
        rejected = shards.path(i).with_suffix(".rejected")
        rejected.unlink(missing_ok=True)  # from an attempt cut short: this one decides
        try:
            with phases("generate"):
                completions = backend.generate([p["messages"] for p in batch], k, sampling)
        except PromptsRejected as e:
            completions = e.results
            _write_lines(rejected, [
                {"where": f"round {settings['round']} generate", "prompt_id": batch[j]["prompt_id"],
                 "reason": f"rejected by the backend: {why}"} for j, why in sorted(e.rejected.items())])
        rows = []
        for p, samples in zip(batch, completions):
            for j, c in enumerate(samples or []):
                if logprobs and not all(col in c for col in KD_COLUMNS):
                    raise RuntimeError(f"generate.teacher_logprobs={logprobs}, but {settings['backend']['_target_']}"
                                       f" returned no top-k log-probs (a sample lacks "
                                       f"{[col for col in KD_COLUMNS if col not in c]})")
                c = {key: value for key, value in c.items() if key in features}
                rows.append({
                    "prompt_id": p["prompt_id"],
                    "messages": p["messages"],
                    "meta": json.dumps(p["meta"], sort_keys=True, default=str),
                    "sample_idx": j,
                    **c,
                    "model": c.get("model") or settings["model"],  # the name a server answered with, if any
                    "round": settings["round"],
                })
        columns = {name: [r.get(name) for r in rows] for name in features}
        shards.finish(i, columns, features, tokens=sum(r["completion_tokens"] for r in rows),
                      seconds=time.perf_counter() - started, phases=phases.seconds(),
                      **({"backend": backend.stats()} if hasattr(backend, "stats") else {}))  # the rank's so far


def _backend_config(cfg: dict, logprobs: int) -> dict:
    """The backend's config for this stage: the hf backend keeps the teacher's top-k log-probs (a training target)
    in float32 under `dtype: auto`, not in bf16, whose logits carry ~3 significant digits; sampling alone uses
    bf16 where the hardware has it (posttrain.models.inference_dtype)."""
    if logprobs and cfg.get("_target_") == "data_gen.hf_backend.HFBackend" and cfg.get("dtype", "auto") == "auto":
        return {**cfg, "dtype": "float32"}
    return cfg


def _sum_stats(stats: list[dict]) -> dict:
    """A backend's stats over ranks: its counters (numbers) summed, anything else (an engine's name, a flag, its
    tensor-parallel size) as the first rank reports it."""
    first = next(s for s in stats if s)

    def counter(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    ranks = [s for s in stats if s]
    return {k: sum(s[k] for s in ranks) if k not in SETTINGS and all(counter(s.get(k)) for s in ranks) else v
            for k, v in first.items()}


SETTINGS = ("tensor_parallel_size", "max_model_len", "gpu_memory_utilization", "max_num_seqs")  # not counters


def _features(teacher_logprobs: int) -> datasets.Features:
    features = GENERATION_FEATURES.copy()
    if teacher_logprobs:
        features.update(kd_features())
    return features


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

    features = _features(cfg.teacher_logprobs)
    size = shard_size(cfg)
    write_text_atomic(out / "prompts.jsonl", "".join(json.dumps(p, default=str) + "\n" for p in prompts))
    settings = {"out": str(out), "shard_size": size, "k": cfg.k, "teacher_logprobs": cfg.teacher_logprobs,
                "backend": cfg.backend, "model": inputs["model"], "seed": job.seed, "round": job.round,
                "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens}}
    started = time.perf_counter()
    attempt = run_ranks("data_gen.generate:generate_shards", settings, out, asdict(job.launch), "generate")
    shards = Shards(out, -(-len(prompts) // size), desc=f"round {job.round} generate", attempt=attempt)
    shard_dir = shards.dir
    throughput = shards.throughput(time.perf_counter() - started)

    rejected = [json.loads(line) for s in sorted(shard_dir.glob("*.rejected")) for line in open(s)]
    if set_aside or rejected:  # written whole, so a rerun after a crash here writes no line twice
        _write_lines(out / "quarantine.jsonl", set_aside + rejected)
    if rejected:
        print(f"posttrain: warning: round {job.round} generate: {len(rejected)} prompts rejected by the backend, "
              f"quarantined (quarantine.jsonl); first: {rejected[0]['prompt_id']}: {rejected[0]['reason'][:200]}",
              file=sys.stderr)
    phases, stats = Phases(), {}
    for side in shards.this_attempt():  # the seconds of this attempt's shards, summed over ranks
        for name, seconds in side["phases"].items():
            phases.add(name, seconds)
        stats[side["rank"]] = side.get("backend")  # each rank's latest
    with phases("save"):  # the shards become the dataset's files: linked, not copied
        publish(shards.files(), out / "generations", features)
    # the columns the metrics read, not the teacher's log-probs
    light = ["prompt_id", "text", "finish_reason", "completion_tokens"]
    finish: Counter = Counter()
    rows = tokens = 0

    def counted():
        nonlocal rows, tokens
        for table in iter_columns(out / "generations", light, 4096):
            for r in table.to_pylist():
                finish[r["finish_reason"]] += 1
                rows, tokens = rows + 1, tokens + r["completion_tokens"]
                yield r

    degenerate = degenerate_samples(counted())
    if cfg.teacher_logprobs:  # Arrow's list lengths: the log-probs are not read into Python
        import pyarrow.compute as pc

        with_logprobs = sum(int(pc.sum(pc.list_value_length(t.column("topk_ids"))).as_py() or 0)
                            for t in iter_columns(out / "generations", ["topk_ids"], 4096))
    for what, share in degenerate.items():
        if share > DEGENERATE_WARNING:
            print(f"posttrain: warning: round {job.round} generate: {share:.0%} of "
                  f"{'prompts have all K samples identical' if what == 'identical_k_rate' else 'answers are empty'}"
                  f" ({what} in the manifest): best-of-K and DPO pairs learn little from them", file=sys.stderr)
    result = StageResult(
        outputs={"generations": "generations"},
        rows=rows,
        metrics={
            "prompts": len(prompts),
            "quarantined": {"empty_prompt": len(set_aside), "rejected_by_backend": len(rejected)},
            "finish_reason": dict(sorted(finish.items())),
            "mean_completion_tokens": tokens / max(rows, 1),
            "seconds": phases.seconds(),  # this attempt's; a resumed stage's earlier shards are not in it
            **({"teacher_logprobs": {"k": cfg.teacher_logprobs, "tokens": with_logprobs}}
               if cfg.teacher_logprobs else {}),
            **degenerate,
            "throughput": throughput,
            **({"backend": _sum_stats(list(stats.values()))} if any(stats.values()) else {}),
        },
    )
    # the work files go last: a crash before this point leaves every shard for the rerun
    shutil.rmtree(shard_dir)
    shutil.rmtree(out / "journal", ignore_errors=True)
    (out / "prompts.jsonl").unlink()
    return result
