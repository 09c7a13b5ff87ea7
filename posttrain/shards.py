"""Sharded, streaming, data-parallel data stages: the machinery `generate`, `score` and `eval` share.

A data stage cuts its work into numbered shards that do not depend on how many processes run them (each shard's
seed comes from its index, never from a rank). Every shard's rows are written as one Arrow file
(`shards/NNNNN.arrow`, in the `datasets` library's own format), atomically, with a small `NNNNN.json` beside it
(rows, tokens, seconds, rank) written after it; a shard with both is done, so a stage killed anywhere, or a
killed rank, resumes from the finished shards and redoes only the others. When every shard is there the files are
hard-linked into a `datasets` folder (`publish`): nothing is parsed or copied again, and the folder is
byte-identical whatever the number of processes that made it. How the work was cut is recorded with the first
attempt (`shard_plan`), so a rerun with other shard sizes keeps the finished shards' cut.

Several processes: `run_ranks` starts `python -m posttrain.shards SETTINGS` under torchrun (the recipe's
`launch` settings: nodes, master address; `launch.data.nproc.<stage>` processes per node; with a DeepSpeed
`launch.hostfile`, through `accelerate launch` and pdsh from this node, as the training stages start), and rank r
takes shards r, r + world, r + 2 x world, ... Ranks share nothing but the stage folder (a filesystem all nodes
see), so no process group is needed; the launcher starts, watches and stops them (a rank that dies ends the
others, and the stage fails; the rerun redoes the missing shards). One process: the same function runs in the
driver's own process.

Reading is streaming and memory-bounded: `iter_columns` reads a dataset's Arrow files in record batches through
plain file reads (no memory map kept open, so the pages read are not held), `read_rows` reads one row range.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow as pa

from posttrain.errors import PosttrainError
from posttrain.rundir import stable_hash, write_text_atomic

SHARDS = "shards"


# ---- reading ------------------------------------------------------------------------------------------------------


def arrow_files(folder: str | Path) -> list[Path]:
    """The Arrow files of a `datasets` folder (as `save_to_disk` or `publish` wrote it), in order."""
    folder = Path(folder)
    state = folder / "state.json"
    if not state.exists():
        raise PosttrainError(f"{folder} is not a datasets folder (no state.json)")
    return [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]


def _batches(path: Path, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of one Arrow stream file (only `columns`, when given: the others are skipped unread), read
    into memory one at a time (freed when dropped)."""
    options = None
    if columns is not None:
        with pa.memory_map(str(path)) as f:  # the schema: a header
            names = pa.ipc.open_stream(f).schema.names
        options = pa.ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])
    with pa.OSFile(str(path)) as f:
        yield from pa.ipc.open_stream(f, options=options)


def _files_of(rows: datasets.Dataset | str | Path) -> list[Path] | None:
    """The Arrow files holding exactly the rows and columns of `rows` (a folder, or a file-backed dataset without
    an indices mapping that is all of its files: `select(range(a, b))` keeps no mapping but is a slice of them),
    or None when the dataset is something else (in memory, selected, sliced, with added columns)."""
    if isinstance(rows, (str, Path)):
        return arrow_files(rows)
    if rows._indices is not None or not rows.cache_files:
        return None
    files = [Path(f["filename"]) for f in rows.cache_files]
    total = 0
    for f in files:
        with pa.memory_map(str(f)) as source:  # batch headers only
            reader = pa.ipc.open_stream(source)
            if reader.schema.names != rows.column_names:
                return None
            total += sum(b.num_rows for b in reader)
    return files if total == len(rows) else None


def iter_columns(rows: datasets.Dataset | str | Path, columns: list[str] | None = None,
                 batch_rows: int = 1024) -> Iterator[pa.Table]:
    """`columns` (all when None) of a dataset or `datasets` folder, in row order, as Arrow tables of at most
    `batch_rows` rows. File-backed datasets are read with plain reads, a record batch at a time, so a pass over a
    large dataset holds one batch in memory (a memory-mapped read keeps every page it touched resident)."""
    files = _files_of(rows)
    if files is None:  # an in-memory or index-mapped dataset: datasets' own batches
        assert isinstance(rows, datasets.Dataset)
        view = rows.select_columns(columns) if columns is not None else rows
        yield from view.with_format("arrow").iter(batch_size=batch_rows)
        return
    for path in files:
        for batch in _batches(path, columns):
            table = pa.Table.from_batches([batch])
            if columns is not None:
                table = table.select(columns)  # in the order asked
            for start in range(0, len(table), batch_rows):
                yield table.slice(start, batch_rows)


def count_rows(folder: str | Path) -> int:
    """Rows of a `datasets` folder, from its Arrow files' batch headers."""
    return sum(_file_rows(path) for path in arrow_files(folder))


def read_rows(files: list[Path], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) of the Arrow files `files` taken as one table, copied into memory (the files are closed
    again, so nothing beyond these rows stays resident)."""
    parts, offset = [], 0
    for path in files:
        if offset >= stop:
            break
        with pa.memory_map(str(path)) as f:  # skipping a batch reads its header, not its buffers
            for batch in pa.ipc.open_stream(f):
                lo, hi = offset, offset + batch.num_rows
                offset = hi
                if hi <= start or lo >= stop:
                    continue
                part = batch.slice(max(start - lo, 0), min(stop, hi) - max(start, lo))
                parts.append(_copy(part))
    schema = parts[0].schema if parts else pa.ipc.open_stream(pa.memory_map(str(files[0]))).schema
    return pa.Table.from_batches(parts, schema=schema)


def _copy(batch: pa.RecordBatch) -> pa.RecordBatch:
    """`batch` with its own buffers (not the memory map's)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    return pa.ipc.open_stream(sink.getvalue()).read_next_batch()


# ---- writing ------------------------------------------------------------------------------------------------------


def write_table(path: Path, table: pa.Table | dict, features: datasets.Features) -> int:
    """Write rows (an Arrow table, or a dict of columns) as one Arrow file in the `datasets` format, atomically
    (a reader sees the whole file or none). Returns the number of rows."""
    return write_batches(path, [table], features)


def write_batches(path: Path, tables, features: datasets.Features) -> int:
    """Write an iterable of Arrow tables (or dicts of columns, encoded by `features`) as one Arrow file in the
    `datasets` format, atomically, holding one at a time. Returns the number of rows."""
    from datasets.arrow_writer import ArrowWriter

    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrowWriter(features=features, path=str(tmp))
    for table in tables:
        if isinstance(table, dict):
            writer.write_batch(table)
        elif table.num_rows:
            writer.write_table(table.cast(features.arrow_schema))
    if not writer.pa_writer:  # nothing written: the file still needs its schema
        writer.write_batch({k: [] for k in features})
    rows, _ = writer.finalize()
    writer.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return rows


def publish(files: list[Path], folder: Path, features: datasets.Features) -> int:
    """Make `files` (Arrow files of `write_table`, in order) the `datasets` folder `folder` (replacing whatever an
    attempt cut short left there) by hard-linking them into it and writing its `dataset_info.json` and, last,
    `state.json`: no row is read or copied, and the files stay where they were until the caller deletes them, so a
    crash here loses nothing. Empty files are left out (one is kept when all are empty, so the folder reloads).
    Returns the number of rows."""
    sizes = [_file_rows(f) for f in files]
    keep = [f for f, n in zip(files, sizes) if n] or files[:1]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    names = [f"data-{i:05d}-of-{len(keep):05d}.arrow" for i in range(len(keep))]
    if not keep:  # no shard at all: an empty table
        names = ["data-00000-of-00001.arrow"]
        write_table(folder / names[0], {k: [] for k in features}, features)
    for f, name in zip(keep, names):
        try:
            os.link(f, folder / name)
        except OSError:  # a filesystem without hard links
            shutil.copyfile(f, folder / name)
    info = datasets.DatasetInfo(features=features)
    write_text_atomic(folder / "dataset_info.json", json.dumps(
        info._to_yaml_dict() | {"features": features.to_dict()}, indent=2, sort_keys=True))
    state = {"_data_files": [{"filename": n} for n in names],
             "_fingerprint": stable_hash([n for n in names] + [sizes]),
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None,
             "_output_all_columns": False, "_split": None}
    write_text_atomic(folder / "state.json", json.dumps(state, indent=2, sort_keys=True))
    return sum(sizes)


def _file_rows(path: Path) -> int:
    with pa.memory_map(str(path)) as f:  # headers only: the buffers are not touched
        return sum(b.num_rows for b in pa.ipc.open_stream(f))


# ---- shards and progress -----------------------------------------------------------------------------------------


def shard_plan(out: Path, plan: dict) -> dict:
    """How a stage's work is cut: the plan an attempt cut short recorded in `out/shards/plan.json` (its finished
    shards were cut that way; shard sizes are launch settings, which may change between attempts), else `plan`,
    recorded now."""
    path = out / SHARDS / "plan.json"
    if path.exists():
        return json.loads(path.read_text())
    shutil.rmtree(path.parent, ignore_errors=True)  # shards cut by an unknown plan cannot be trusted
    path.parent.mkdir(parents=True)
    write_text_atomic(path, json.dumps(plan, sort_keys=True))
    return plan


class Shards:
    """The shards of one stage attempt under `out/shards/`: `n` numbered shards, rank `rank` of `world` taking
    every world-th one. `done(i)`: its Arrow file is there; `finish(i, ...)` writes it and its sidecar."""

    def __init__(self, out: Path, n: int, rank: int = 0, world: int = 1, desc: str = "", attempt: str = ""):
        self.dir = out / SHARDS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.n, self.rank, self.world, self.desc = n, rank, world, desc
        self.attempt = attempt or f"{os.getpid()}"
        self._started = time.perf_counter()
        self._last_print = 0.0

    def path(self, i: int) -> Path:
        return self.dir / f"{i:05d}.arrow"

    def done(self, i: int) -> bool:
        return self.path(i).exists() and self.path(i).with_suffix(".json").exists()

    def todo(self) -> list[int]:
        """This rank's shards that are not done yet, in order."""
        return [i for i in range(self.rank, self.n, self.world) if not self.done(i)]

    def finish(self, i: int, table: pa.Table | dict, features: datasets.Features, tokens: int = 0,
               seconds: float = 0.0, **extra) -> None:
        """Write shard i's rows, then its sidecar (rows, tokens, seconds, rank): the sidecar marks it done."""
        rows = write_table(self.path(i), table, features)
        write_text_atomic(self.path(i).with_suffix(".json"), json.dumps(
            {"rows": rows, "tokens": tokens, "seconds": round(seconds, 3), "rank": self.rank, "attempt": self.attempt,
             **extra}))
        self.report()

    def sidecars(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.dir.glob("[0-9]*.json"))]

    def this_attempt(self) -> list[dict]:
        """The sidecars of the shards this attempt made (not those a killed attempt left)."""
        return [d for d in self.sidecars() if d.get("attempt") == self.attempt]

    def report(self, force: bool = False) -> None:
        """Print the stage's progress across ranks (from the shared folder) to stderr, at most every 10 s."""
        now = time.perf_counter()
        if self.rank != 0 or (not force and now - self._last_print < 10 and self._last_print):
            return
        self._last_print = now
        done = self.sidecars()
        rows, tokens = sum(d["rows"] for d in done), sum(d["tokens"] for d in done)
        mine = [d for d in done if d.get("attempt") == self.attempt]
        elapsed = now - self._started
        rate = len(mine) / elapsed if elapsed > 0 else 0.0
        left = self.n - len(done)
        eta = f"{left / rate:,.0f} s" if rate > 0 else "?"
        speed = (f"{sum(d['rows'] for d in mine) / elapsed:,.1f} rows/s, "
                 f"{sum(d['tokens'] for d in mine) / elapsed:,.0f} tokens/s") if elapsed > 0 else ""
        print(f"posttrain: {self.desc}: {len(done)}/{self.n} shards ({rows:,} rows, {tokens:,} tokens); "
              f"{speed} x {self.world} processes; ETA {eta}", file=sys.stderr, flush=True)

    def throughput(self, seconds: float) -> dict:
        """The manifest's `throughput`: rows, tokens and shards of this stage, the wall seconds of this attempt,
        and rows/s and tokens/s over the shards this attempt made."""
        done = self.sidecars()
        mine = [d for d in done if d.get("attempt") == self.attempt]
        return {"shards": len(done), "resumed_shards": len(done) - len(mine),
                "processes": max(len({d["rank"] for d in mine}), 1),
                "rows": sum(d["rows"] for d in done), "tokens": sum(d["tokens"] for d in done),
                "seconds": round(seconds, 3),
                "rows_per_s": round(sum(d["rows"] for d in mine) / seconds, 2) if seconds > 0 else None,
                "tokens_per_s": round(sum(d["tokens"] for d in mine) / seconds, 1) if seconds > 0 else None}

    def files(self) -> list[Path]:
        missing = [i for i in range(self.n) if not self.done(i)]
        if missing:
            raise PosttrainError(f"{self.desc}: shards {missing[:10]} of {self.n} were not written")
        return [self.path(i) for i in range(self.n)]


# ---- running on several processes ---------------------------------------------------------------------------------


def processes(launch: dict, stage: str) -> int:
    """The processes a data stage runs on: `launch.data.nproc.<stage>` on each of `launch.nnodes`, when the recipe
    names the stage there; otherwise 1, the driver's own (an endpoint's concurrency, say, is not multiplied)."""
    nproc = ((launch.get("data") or {}).get("nproc") or {}).get(stage)
    return int(nproc) * int(launch.get("nnodes", 1)) if nproc else 1


def run_ranks(fn: str, settings: dict, out: Path, launch: dict, stage: str) -> str:
    """Run `fn` ("module:function", called as fn(settings, rank, world); `settings` gains `attempt`, an id the
    shards it writes carry) over every shard: in this process when the stage has one process (`processes`), else
    as torchrun processes (`launch`: the recipe's LaunchConfig as a dict), waiting for them; their output goes to
    `out/<stage>.log` and the terminal. Returns the attempt id."""
    from posttrain.train.launch import run_training

    settings = {**settings, "attempt": f"{os.getpid()}-{time.time_ns()}"}
    if processes(launch, stage) == 1:
        _call(fn, settings, 0, 1)
        return settings["attempt"]
    nproc = processes(launch, stage) // int(launch.get("nnodes", 1))
    if launch.get("hostfile"):  # accelerate with DeepSpeed's pdsh launcher starts every node from this one
        data_launch = {k: v for k, v in launch.items() if k != "data"}
    else:
        data_launch = {k: launch[k] for k in ("nnodes", "node_rank", "master_addr", "master_port") if k in launch}
        data_launch["launcher"] = "torchrun"
    run_training("posttrain.shards", {"fn": fn, "settings": settings}, out, {**data_launch, "nproc": nproc},
                 log_name=f"{stage}.log", config_name=f"{stage}_ranks.json")
    return settings["attempt"]


def _call(fn: str, settings: dict, rank: int, world: int) -> None:
    module, name = fn.split(":")
    getattr(importlib.import_module(module), name)(settings, rank, world)


def gpu_slice(local_rank: int, local_world: int, visible: list[str]) -> list[str]:
    """The GPUs a node's local rank `local_rank` of `local_world` uses out of the node's `visible` ones: an equal
    slice each, so 8 GPUs and 2 processes give one 4-GPU tensor-parallel engine per process, 8 processes one
    reward-model replica per GPU.

    >>> gpu_slice(1, 2, list("01234567")), gpu_slice(3, 8, list("01234567")), gpu_slice(0, 2, [])
    (['4', '5', '6', '7'], ['3'], [])
    """
    if not visible or local_world <= 1:
        return visible
    per = len(visible) // local_world
    if per == 0:
        raise PosttrainError(f"launch.data.nproc: {local_world} processes per node, but the node has {len(visible)} "
                             f"GPUs; use at most one process per GPU")
    return visible[local_rank * per : (local_rank + 1) * per]


def _visible_gpus(ignore_env: bool = False) -> list[str]:
    """The node's GPUs, without initialising CUDA in this process (which would fix its device list):
    CUDA_VISIBLE_DEVICES unless `ignore_env`, else what nvidia-smi lists."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None and not ignore_env:
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    import subprocess

    if not shutil.which("nvidia-smi"):  # no NVIDIA GPU here
        return []
    found = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                           text=True, check=False)
    return [line.strip() for line in found.stdout.splitlines() if line.strip()] if found.returncode == 0 else []


def main(argv: list[str] | None = None) -> None:
    """A rank of a data stage: `python -m posttrain.shards SETTINGS.json` under torchrun, on its slice of the
    node's GPUs (`gpu_slice`)."""
    from posttrain.train.launch import die_with_parent

    die_with_parent()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    # torchrun says LOCAL_WORLD_SIZE; DeepSpeed's launcher (a hostfile) says LOCAL_SIZE and narrows
    # CUDA_VISIBLE_DEVICES to the node's first nproc GPUs, so there the node's GPUs come from nvidia-smi.
    deepspeed = "LOCAL_SIZE" in os.environ and "LOCAL_WORLD_SIZE" not in os.environ
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
    gpus = _visible_gpus(ignore_env=deepspeed)
    if local_world > 1 or deepspeed:
        gpus = gpu_slice(int(os.environ.get("LOCAL_RANK", 0)), local_world, gpus)
        if gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    # Ranks share only files: the launcher's variables would make an engine inside (vLLM's own workers, a device
    # map) believe it is one rank of a process group.
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE"):
        os.environ.pop(name, None)
    spec = json.loads(Path((argv or sys.argv)[-1]).read_text())
    _call(spec["fn"], spec["settings"], rank, world)


if __name__ == "__main__":
    main()
