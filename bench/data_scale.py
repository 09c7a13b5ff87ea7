"""Seconds, rows/s and peak memory of the data stages by dataset size: merge -> score -> dedup -> select.

    OMP_NUM_THREADS=1 python bench/data_scale.py [--rows 100000 300000 1000000] [--quick] [--workdir DIR] [--keep]

Synthetic generations stand in for the generate stage's output: K = 30 samples per prompt (`--k`), each ~2 KB of
text (`--text-bytes`, ~330 words) drawn (seeded) from a Zipf-weighted vocabulary of 4,000 made-up words with
sentence ends and commas; 3% of the rows are exact copies of a row of another prompt and 3% near copies (5 words
changed, MinHash Jaccard ~0.9); `finish_reason` "stop", `completion_tokens` = characters / 4, all the columns of
`data_gen.generate.GENERATION_FEATURES`. The rows are written shard by shard (256 prompts a shard, an endpoint's
default `generate.shard_size`), so making 1M rows needs one shard's memory. Then the stages run on them, each
calling the project's own code:

  make    (setup, not timed in the pipeline) the generate stage's shards: JSONL files where the code has no
          `posttrain.shards`, else Arrow files written with `posttrain.shards.Shards.finish`
  merge   the generate stage's shard merge: `data_gen.generate._concatenate` + `save_to_disk` (JSONL shards), or
          `posttrain.shards.publish` (Arrow shards); the shard folders are removed as the stage removes them
  score   `reward.score.score` with one rule reward (`reward.verifiers.LengthPenalty`, target 300 words, no model)
  dedup   `reward.filters.filter_stage` with `reward.dedup.TextDedup` (exact + MinHash/LSH, its defaults)
  select  `reward.select.select` (best-of-K and best-vs-worst pairs, SelectConfig's defaults but `--max-similarity`)
          on the kept rows

Every size runs in a fresh subprocess, and every stage in a fresh subprocess of its own, so each peak RSS
(`ru_maxrss`) is that stage's alone (it includes the ~0.3 GB of imports, shown as `RSS start`: the resident memory
just before the stage function is called). Stages pass their data through their folders under a temporary
directory in `--workdir` (removed at the end unless `--keep`). `seconds` is the stage function's wall time;
`rows/s` its input rows over it; `pipeline` sums merge to select and takes the largest peak. The imported code is
whatever `posttrain` resolves to (PYTHONPATH first: `PYTHONPATH=/path/to/checkout` measures another checkout); the
header says which.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

STAGES = ["make", "merge", "score", "dedup", "select"]
TIMED = STAGES[1:]
VOCAB, EXACT, NEAR, NEAR_WORDS, TARGET_WORDS = 4000, 0.03, 0.03, 5, 300
REWARD = {"_target_": "reward.verifiers.LengthPenalty", "target_words": TARGET_WORDS}


# ---- synthetic generations ---------------------------------------------------------------------------------------


def vocabulary(seed: int):
    """(words as a numpy object array, their Zipf probabilities): 4,000 made-up words of 2 to 8 letters, 6% ending
    a sentence ("."), 4% with a comma."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lengths = rng.integers(2, 9, VOCAB)
    words = ["".join(rng.choice(letters, n)) for n in lengths]
    ends = rng.random(VOCAB)
    words = [w + ("." if e < 0.06 else "," if e < 0.10 else "") for w, e in zip(words, ends)]
    probs = 1.0 / (np.arange(VOCAB) + 10.0)
    return np.array(words, dtype=object), probs / probs.sum()


def shard_rows(index: int, first_prompt: int, n_prompts: int, total_rows: int, k: int, text_bytes: int,
               seed: int, vocab) -> dict[str, list]:
    """Shard `index`: prompts first_prompt .. first_prompt + n_prompts - 1, K samples each (fewer for the last
    prompt when `total_rows` says so), as columns. Seeded by (seed, shard index)."""
    import numpy as np

    words, probs = vocab
    rng = np.random.default_rng([seed, index])
    mean_word = float(sum(p * (len(w) + 1) for w, p in zip(words, probs)))
    sizes = [min(k, total_rows - (first_prompt + i) * k) for i in range(n_prompts)]
    n = sum(sizes)
    counts = np.maximum(8, np.round(text_bytes / mean_word * rng.uniform(0.8, 1.2, n))).astype(np.int64)
    picks = rng.choice(len(words), int(counts.sum()), p=probs)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    texts = [" ".join(words[picks[bounds[i] : bounds[i + 1]]].tolist()) for i in range(n)]
    prompt_of = np.repeat(np.arange(n_prompts), sizes)
    starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
    # copies: of a fresh row of an earlier prompt of this shard (the first prompt's rows are all fresh)
    kind = rng.choice(3, n, p=[1 - EXACT - NEAR, EXACT, NEAR])
    kind[: sizes[0]] = 0
    fresh = np.flatnonzero(kind == 0)
    for i in np.flatnonzero(kind):
        before = fresh[: np.searchsorted(fresh, starts[prompt_of[i]])]
        text = texts[int(before[rng.integers(len(before))])]
        if kind[i] == 2:
            parts = text.split(" ")
            for j in rng.choice(len(parts), NEAR_WORDS, replace=False):
                parts[j] = words[rng.integers(len(words))]
            text = " ".join(parts)
        texts[i] = text
    asks = [" ".join(words[rng.integers(0, 400, rng.integers(6, 20))].tolist()) for _ in range(n_prompts)]
    messages = [[{"role": "user", "content": f"Write about {a}"}] for a in asks]
    return {
        "prompt_id": [f"p{first_prompt + p:07d}" for p in prompt_of],
        "messages": [messages[p] for p in prompt_of],
        "meta": ["{}"] * n,
        "sample_idx": [int(i - starts[p]) for i, p in enumerate(prompt_of)],
        "text": texts,
        "prompt_tokens": [len(messages[p][0]["content"]) // 4 + 5 for p in prompt_of],
        "completion_tokens": [len(t) // 4 for t in texts],
        "finish_reason": ["stop"] * n,
        "model": ["bench/synthetic"] * n,
        "round": [1] * n,
    }


# ---- one stage, in its own process -------------------------------------------------------------------------------


def merge_kind() -> str:
    """"arrow" when the imported posttrain has `posttrain.shards` (its own file, not another checkout's found by
    the editable install's finder), else "jsonl"."""
    import importlib.util

    import posttrain

    spec = importlib.util.find_spec("posttrain.shards")
    mine = spec is not None and spec.origin and Path(spec.origin).parent == Path(posttrain.__file__).parent
    return "arrow" if mine else "jsonl"


def _rss_now_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return float("nan")


def _rows(folder: Path) -> int:
    import datasets

    return len(datasets.load_from_disk(str(folder)))


def run_stage(stage: str, size_dir: Path, rows: int, args) -> dict:
    """Run one stage on the folders under `size_dir`; returns its figures (and writes them beside its folder)."""
    import datasets  # noqa: F401 - imported before RSS start, as every stage imports it

    from data_gen.generate import GENERATION_FEATURES

    out = size_dir / stage
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    make = size_dir / "make"
    info: dict = {}
    if stage == "make":
        import posttrain
        import reward.score

        kind = merge_kind()
        n_prompts = -(-rows // args.k)
        n_shards = -(-n_prompts // args.shard_prompts)
        info = {"kind": kind, "shards": n_shards, "prompts": n_prompts, "text_mb": 0.0,
                "posttrain": str(Path(posttrain.__file__).parent.parent),
                "reward_score": reward.score.__file__}
        vocab = vocabulary(args.seed)
        shards = None
        if kind == "arrow":
            from posttrain.shards import Shards

            shards = Shards(make, n_shards)
        else:
            (make / "shards").mkdir()
        rss_start, start, cpu = _rss_now_mb(), time.perf_counter(), time.process_time()
        for i in range(n_shards):
            first = i * args.shard_prompts
            cols = shard_rows(i, first, min(args.shard_prompts, n_prompts - first), rows, args.k, args.text_bytes,
                              args.seed, vocab)
            info["text_mb"] += sum(len(t) for t in cols["text"]) / 1e6
            if shards is not None:
                shards.finish(i, cols, GENERATION_FEATURES, tokens=sum(cols["completion_tokens"]))
            else:  # as data_gen.generate._write_lines writes a shard
                lines = (json.dumps(dict(zip(cols, values)), default=str) + "\n" for values in zip(*cols.values()))
                (make / "shards" / f"{i:05d}.jsonl").write_text("".join(lines))
        rows_in = rows_out = rows
    elif stage == "merge":
        made = json.loads((size_dir / "make.json").read_text())
        rows_in = rows
        rss_start, start, cpu = _rss_now_mb(), time.perf_counter(), time.process_time()
        if made["kind"] == "arrow":
            from posttrain.shards import Shards, publish

            publish(Shards(make, made["shards"]).files(), out / "generations", GENERATION_FEATURES)
        else:
            from data_gen.generate import _concatenate

            generations = _concatenate(sorted((make / "shards").glob("*.jsonl")), GENERATION_FEATURES, out / "arrow")
            generations.save_to_disk(str(out / "generations"))
            del generations
            shutil.rmtree(out / "arrow", ignore_errors=True)
        shutil.rmtree(make / "shards")
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows_out = _rows(out / "generations")
    elif stage == "score":
        from posttrain.config import RewardConfig
        from reward.score import score

        cfg = RewardConfig(rewards={"rule": dict(REWARD)}, primary="rule", batch_size=64)
        rows_in = rows
        rss_start, start, cpu = _rss_now_mb(), time.perf_counter(), time.process_time()
        result = score(cfg, {"generations": str(size_dir / "merge" / "generations")}, out)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows_out = _rows(out / "scored")
        info = {"quarantined": result.metrics.get("quarantined")}
    elif stage == "dedup":
        from posttrain.config import FilterConfig
        from reward.filters import filter_stage

        cfg = FilterConfig(filters={"dedup": {"_target_": "reward.dedup.TextDedup"}})
        rows_in = rows
        rss_start, start, cpu = _rss_now_mb(), time.perf_counter(), time.process_time()
        result = filter_stage(cfg, {"scored": str(size_dir / "score" / "scored")}, out)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows_out = result.rows["kept"]
        info = {"reasons": result.metrics["filters"]["dedup"]["reasons"]}
    elif stage == "select":
        from posttrain.config import SelectConfig, SelectJob
        from reward.select import select

        kept = size_dir / "dedup" / "kept"
        rows_in = _rows(kept)
        rss_start, start, cpu = _rss_now_mb(), time.perf_counter(), time.process_time()
        result = select(SelectJob(select=SelectConfig(max_similarity=args.max_similarity)), {"scored": str(kept)}, out)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        rows_out = result.rows["sft"]
        info = {"pairs": result.rows["pairs"], "dropped": result.metrics.get("dropped")}
    else:
        raise ValueError(f"unknown stage {stage!r}")
    if stage == "make":
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"stage": stage, "rows_in": rows_in, "rows_out": rows_out, "seconds": seconds, "cpu_seconds": cpu,
            "rss_start_mb": rss_start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **info}


# ---- one size: its stages in turn, each a fresh process ---------------------------------------------------------


def _child(flags: list[str], log: Path, env: dict) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), *flags]
    with open(log, "w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{' '.join(flags)} failed (exit {code}); the end of {log}:\n{tail}")


def run_size(rows: int, size_dir: Path, args, env: dict) -> dict:
    size_dir.mkdir(parents=True, exist_ok=True)
    common = ["--k", str(args.k), "--text-bytes", str(args.text_bytes), "--shard-prompts", str(args.shard_prompts),
              "--seed", str(args.seed), "--max-similarity", str(args.max_similarity)]
    results = {}
    for stage in STAGES:
        _child(["--stage", stage, "--size-dir", str(size_dir), "--one", str(rows), *common],
               size_dir / f"{stage}.log", env)
        results[stage] = json.loads((size_dir / f"{stage}.json").read_text())
    return results


# ---- the tables --------------------------------------------------------------------------------------------------


def _rate(rows: int, seconds: float) -> str:
    return f"{rows / seconds:,.0f}" if seconds > 0 else "-"


def _print_size(rows: int, r: dict) -> None:
    made = r["make"]
    print(f"\n{rows:,} rows: {made['prompts']:,} prompts x K={made.get('k', '')}, {made['shards']} shards, "
          f"{made['text_mb']:,.0f} MB of response text")
    print(f"  {'stage':<9} {'rows in':>9} {'rows out':>9} {'seconds':>9} {'CPU s':>9} {'rows/s':>10} "
          f"{'RSS start':>10} {'peak RSS':>10}")
    for stage in STAGES:
        s = r[stage]
        label = "make*" if stage == "make" else stage
        print(f"  {label:<9} {s['rows_in']:>9,} {s['rows_out']:>9,} {s['seconds']:>9.2f} {s['cpu_seconds']:>9.2f} "
              f"{_rate(s['rows_in'], s['seconds']):>10} {s['rss_start_mb']:>7,.0f} MB {s['peak_rss_mb']:>7,.0f} MB")
    seconds = sum(r[s]["seconds"] for s in TIMED)
    cpu = sum(r[s]["cpu_seconds"] for s in TIMED)
    peak = max(r[s]["peak_rss_mb"] for s in TIMED)
    print(f"  {'pipeline':<9} {rows:>9,} {r['select']['rows_out']:>9,} {seconds:>9.2f} {cpu:>9.2f} "
          f"{_rate(rows, seconds):>10} {'':>10} {peak:>7,.0f} MB")
    print(f"  * setup (writing the synthetic shards), not in the pipeline. dedup removed "
          f"{r['dedup'].get('reasons')}; select: {r['select']['rows_out']:,} SFT rows, {r['select']['pairs']:,} "
          f"pairs, dropped {r['select'].get('dropped')}")


def _print_summary(sizes: list[int], results: dict) -> None:
    print("\nper stage: seconds / peak RSS; last column: the pipeline's seconds per row against the first size's")
    print(f"{'rows':>9} " + " ".join(f"{s:>18}" for s in TIMED) + f" {'pipeline':>18} {'rows/s':>7} {'s/row':>6}")
    base = None
    for n in sizes:
        r = results[n]
        cells = [f"{r[s]['seconds']:.1f} s {r[s]['peak_rss_mb']:,.0f} MB" for s in TIMED]
        seconds = sum(r[s]["seconds"] for s in TIMED)
        peak = max(r[s]["peak_rss_mb"] for s in TIMED)
        base = base or seconds / n
        print(f"{n:>9,} " + " ".join(f"{c:>18}" for c in cells) + f" {f'{seconds:.1f} s {peak:,.0f} MB':>18} "
              f"{_rate(n, seconds):>7} {seconds / n / base:>5.2f}x")
    if len(sizes) > 1:
        print("seconds per row of each stage against the first size's (1.00x: linear):")
        r0 = results[sizes[0]]
        for n in sizes[1:]:
            r = results[n]
            print(f"{n:>9,} " + " ".join(
                f"{s} {(r[s]['seconds'] / n) / max(r0[s]['seconds'] / sizes[0], 1e-12):.2f}x" for s in TIMED))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--quick", action="store_true", help="3,000 and 9,000 rows: a smoke check")
    parser.add_argument("--k", type=int, default=30, help="samples per prompt")
    parser.add_argument("--text-bytes", type=int, default=2048, help="mean response length in characters")
    parser.add_argument("--shard-prompts", type=int, default=256, help="prompts per generate shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-similarity", type=float, default=0.95,
                        help="select.max_similarity (1.0 turns off select's difflib near-duplicate check of each pair)")
    parser.add_argument("--workdir", default=None, help="where the temporary stage folders go (default: TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the stage folders")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # child mode: one size (or one stage of it)
    parser.add_argument("--size-dir", help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args()

    # the checkout this script is in comes after anything already on PYTHONPATH (which wins: another checkout)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + ([root] if root not in path else []))}
    if args.stage:  # a stage: figures into SIZE_DIR/STAGE.json
        result = run_stage(args.stage, Path(args.size_dir), args.one, args)
        result["k"] = args.k
        (Path(args.size_dir) / f"{args.stage}.json").write_text(json.dumps(result, default=str))
        return
    if args.one:  # a size: its stages' figures as JSON on stdout
        print(json.dumps(run_size(args.one, Path(args.size_dir), args, env)))
        return

    sizes = [3000, 9000] if args.quick else args.rows
    work = Path(tempfile.mkdtemp(prefix="data-scale-", dir=args.workdir))
    print(f"data stages on synthetic generations: K={args.k}, ~{args.text_bytes} B a response, "
          f"{EXACT:.0%} exact + {NEAR:.0%} near duplicates, {args.shard_prompts} prompts a shard; reward "
          f"{REWARD['_target_']}; OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, {os.cpu_count()} CPUs; "
          f"stage folders under {work}", flush=True)
    results = {}
    try:
        for n in sizes:
            size_dir = work / f"rows-{n}"
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--size-dir", str(size_dir),
                   "--k", str(args.k), "--text-bytes", str(args.text_bytes), "--shard-prompts",
                   str(args.shard_prompts), "--seed", str(args.seed), "--max-similarity", str(args.max_similarity)]
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
            if proc.returncode:
                raise SystemExit(f"rows {n}: failed (exit {proc.returncode})")
            results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
            if n == sizes[0]:
                made = results[n]["make"]
                merge = ("posttrain.shards: Arrow shards, publish" if made["kind"] == "arrow"
                         else "JSONL shards, data_gen.generate._concatenate + save_to_disk")
                print(f"code: {made['posttrain']} (reward.score: {made['reward_score']}); merge: {merge}")
            _print_size(n, results[n])
            sys.stdout.flush()
            if not args.keep:
                shutil.rmtree(size_dir, ignore_errors=True)
        _print_summary(sizes, results)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"stage folders kept in {work}")


if __name__ == "__main__":
    main()
