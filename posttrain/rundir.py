"""The run directory: stage folders, the manifest, and the resume rules.

```
runs/<name>/
  config.yaml        resolved recipe of the latest invocation (secrets redacted); older ones in config.history/
  manifest.json      {"stages": [...], "superseded": [...]}: one entry per finished stage, written last
  round_N/NN_<stage>/
```
A stage runs in `round_N/.NN_<stage>.partial/` and is renamed into place when it has finished; its manifest entry
is written after the rename, atomically. So a stage folder without an entry is partial: it is wiped and redone.
A stage that can resume inside itself (Trainer checkpoints, generation shards) keeps its partial folder when it
was started by the same stage config on the same inputs.

A finished stage is skipped when its config and inputs are unchanged. If they changed, the run stops with an
error naming the stage and the keys that differ, unless the stage is listed in `redo` or its inputs were remade
by a stage redone in this invocation; then the old folder moves to `round_N/superseded/` (never deleted) and
the stage runs again.

The run directory knows no stage by name: it is given the ordered table of stages (`Stage`: name, function,
whether it resumes inside its folder, the training module a dry run shows the command of), and numbers the
folders by their place in it. The driver's table is `recipes.loop.STAGES`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError

# 2: typed stage configs and list inputs (`plain`, `Inputs`); 1 (no "format" key): untyped dict configs.
MANIFEST_FORMAT = 2
# Settings that say how a stage runs, not what it computes: a run resumes on other hardware with other values.
UNHASHED = ("launch", "adapter_only")  # TrainJob: how a stage runs, and in which form it hands its model on
_VERSIONED = ("posttrain", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed",
              "hydra-core")


class StageChanged(PosttrainError):
    pass


class StageError(PosttrainError):
    """A stage raised: the message names the stage and the cause; the traceback is in the stage's error.log."""


@dataclass
class StageResult:
    """What a stage function returns: output paths relative to its folder, row counts, and anything worth
    recording (metrics, quarantine counts)."""

    outputs: dict[str, str]
    rows: int | dict[str, int] = 0
    metrics: dict[str, Any] = field(default_factory=dict)


# A stage's inputs: name -> a path or model spec, or a list of them (every round's SFT data, say). Each path is
# fingerprinted, so a changed input is noticed.
Inputs = dict[str, str | list[str]]


@dataclass(frozen=True)
class Stage:
    """One row of the stage table: `fn(cfg, inputs, out_dir) -> StageResult` runs the stage in `out_dir`.
    `resumable`: a partial folder left by a crash is kept (Trainer checkpoints, finished shards) when the same
    config and inputs start it again. `module`: the process a training stage starts, shown by dry runs."""

    name: str
    fn: Callable[[Any, Inputs, Path], StageResult]
    resumable: bool = False
    module: str | None = None


_SECRET = re.compile(r"(^|_)(api_key|apikey|secret|password|passwd|token|auth)$", re.IGNORECASE)
URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URL


def redact(node: Any) -> Any:
    """A copy of plain config data (dicts, lists, strings) with secret-looking keys' values and credentials inside
    URLs replaced by `<redacted>`. Every file a run writes about its config goes through it."""
    if isinstance(node, dict):
        return {k: "<redacted>" if _SECRET.search(str(k)) and v is not None else redact(v) for k, v in node.items()}
    if isinstance(node, list):
        return [redact(v) for v in node]
    if isinstance(node, str):
        return URL_CREDENTIALS.sub("<redacted>@", node)
    return node


def redact_override(override: str) -> str:
    """`key=value` from the command line with the value redacted as `redact` would for that key."""
    key, eq, value = override.partition("=")
    if not eq:
        return override
    return f"{key}={'<redacted>' if _SECRET.search(key.rsplit('.', 1)[-1].lstrip('+~')) else redact(value)}"


def plain(config: Any) -> Any:
    """A stage config as the run directory records it: JSON-ready data (dataclasses as dicts, Enums as their values)
    with secrets redacted, so `stage_config.json` and the config hash hold no key (a rotated key redoes nothing)."""
    return redact(json.loads(json.dumps(asdict(config) if is_dataclass(config) else config, default=str)))


PARTIAL = ".partial"  # a stage runs in round_N/.NN_<stage>.partial/, renamed to round_N/NN_<stage>/ when done


def stage_names(folder: Path) -> tuple[str, str, str]:
    """(run directory name, round folder name, stage name) of a stage's folder, finished or partial:
    `runs/x/round_1/.05_sft.partial` -> ("x", "round_1", "sft"). A folder not named like one: its own name."""
    name = folder.name.lstrip(".").removesuffix(PARTIAL)
    number, _, stage = name.partition("_")
    return folder.parent.parent.name, folder.parent.name, stage if number.isdigit() and stage else name


def stable_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_hash_of(config: Any) -> str:
    return _hash_recorded(plain(config))


def _hash_recorded(recorded: dict) -> str:
    """The config hash of a stage config as `plain` records it: all but the settings of how the stage runs (the
    top-level UNHASHED sections, and the `unhashed` arguments a `_target_` class names, e.g. an endpoint
    backend's URLs, keys, retries and concurrency)."""
    return stable_hash(_hashed_part(recorded))


# Settings added after run directories already existed, at the value that does what the code did before them: left
# out of a stage's hash at that value, so a finished stage is not "changed" by an upgrade. Set to anything else,
# they are hashed like every other key. (`report_to` of evals says where results go, not what they are.)
ADDED_AT_DEFAULT = {"warmup_steps": 0, "optim": None, "max_grad_norm": None, "gradient_checkpointing": None,
                    "attn_implementation": None, "dtype": None, "data": [], "packing": False, "loss_type": "sigmoid",
                    "label_smoothing": 0.0, "num_prompts": None, "report_to": None,
                    "teacher_logprobs": 0, "kd": {"weight": 0.0, "temperature": 1.0}, "scorer": {}}


def _hashed_part(recorded: dict) -> dict:
    return _without_unhashed({k: v for k, v in recorded.items() if k not in UNHASHED})


def _without_added_defaults(node: Any) -> Any:
    if isinstance(node, dict) and "_target_" not in node:  # a plug-in's own arguments are all hashed
        return {k: _without_added_defaults(v) for k, v in node.items()
                if not (k in ADDED_AT_DEFAULT and v == ADDED_AT_DEFAULT[k] and type(v) is type(ADDED_AT_DEFAULT[k]))}
    if isinstance(node, list):
        return [_without_added_defaults(v) for v in node]
    return node


def _unhashed_arguments(target: Any) -> tuple[str, ...]:
    try:
        from hydra.utils import get_object

        return tuple(getattr(get_object(target), "unhashed", ()))
    except Exception:  # noqa: BLE001 - a class that no longer imports: hash everything
        return ()


def _without_unhashed(node: Any) -> Any:
    if isinstance(node, dict):
        drop = _unhashed_arguments(node["_target_"]) if isinstance(node.get("_target_"), str) else ()
        return {k: _without_unhashed(v) for k, v in _without_added_defaults(node).items() if k not in drop}
    if isinstance(node, list):
        return [_without_unhashed(v) for v in node]
    return node


def tree_hash(path: Path) -> str:
    """Content hash of a file or folder (relative paths and bytes), used to fingerprint stage outputs."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file, flush it to disk, then rename it over `path`: readers see old or new."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str))


def _output_sizes(folder: Path, outputs: dict[str, str]) -> dict[str, list[int]]:
    """name -> [files, bytes] of each declared output under `folder` ([0, 0] when it is gone)."""
    sizes = {}
    for name, rel in sorted(outputs.items()):
        path = folder / rel
        if path.is_file():
            files = [path]
        else:  # a folder, or nothing when it was deleted (rglob of a missing path yields nothing)
            files = [p for p in path.rglob("*") if p.is_file()]
        sizes[name] = [len(files), sum(f.stat().st_size for f in files)]
    return sizes


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [d for k in keys for d in _diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "<value>"]


class _PlannedOutputs(dict):
    """Outputs of a stage a dry run only plans: any output name maps to a path inside its folder."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = folder

    def __missing__(self, name: str) -> str:
        return f"{self.folder}/{name}"


class RunDir:
    """A run directory opened by one driver at a time (an exclusive lock on `.lock`).

    With `dry_run=True` nothing is created or run: `run_stage` prints what it would do (skip, run, redo, or the
    error a changed stage would raise), the command of a training stage and the stage's resolved config."""

    def __init__(self, root: str | Path, stages: list[Stage], redo: list[str] | tuple[str, ...] = (),
                 dry_run: bool = False):
        self.root = Path(root).expanduser().resolve()
        self.stages = {s.name: s for s in stages}
        # Fixed numbers keep folders in data-flow order whichever stages a recipe runs.
        self.numbers = {s.name: i for i, s in enumerate(stages)}
        self.dry_run = dry_run
        self.planned: list[dict] = []
        self._lock = None
        if not dry_run:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / ".lock", "w")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.close()
                raise PosttrainError(f"run directory {self.root} is in use by another posttrain process") from None
        self.redo = set(redo)
        self.manifest_path = self.root / "manifest.json"
        self.manifest = self._read_manifest()
        # Output hashes of stages (re)made by this invocation: stages fed by them may be redone automatically.
        self._fresh_outputs: set[str] = set()
        self.ran: list[str] = []  # stage ids that did work in this invocation

    def _read_manifest(self) -> dict:
        if not self.manifest_path.exists():
            finished = sorted(str(p.relative_to(self.root)) for p in self.root.glob("round_*/[0-9][0-9]_*")
                              if (p / ".stage.json").exists())
            if len(finished) > 1:  # one folder is a stage whose entry a kill cut off; more, a lost manifest
                self.close()
                raise PosttrainError(
                    f"{self.manifest_path} is missing, but {self.root} holds finished stage folders ({finished[:3]}"
                    f"{' ...' if len(finished) > 3 else ''}): restore manifest.json, or start a new run_dir. Nothing "
                    f"was changed")
            return {"format": MANIFEST_FORMAT, "stages": [], "superseded": []}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.close()
            raise PosttrainError(
                f"{self.manifest_path} is not valid JSON ({e}): it is written atomically, so it was edited or "
                f"truncated by hand. Restore it from a backup, or start a new run_dir; the stage folders are kept"
            ) from None
        if manifest.get("stages") and manifest.get("format", 1) < MANIFEST_FORMAT:
            self.close()
            raise PosttrainError(
                f"{self.root} was started by an older posttrain (manifest format {manifest.get('format', 1)}; this "
                f"one records typed stage configs, format {MANIFEST_FORMAT}): its finished stages cannot be matched "
                f"to this version's. Finish it with the version that started it, or start a new run_dir"
            )
        manifest.setdefault("superseded", [])
        manifest["format"] = MANIFEST_FORMAT
        return manifest

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()

    # ---- manifest ---------------------------------------------------------------------------------------------
    def entry(self, round_idx: int, stage: str) -> dict | None:
        for e in self.manifest["stages"] + self.planned:
            if e["round"] == round_idx and e["stage"] == stage:
                return e
        return None

    def stage_dir(self, round_idx: int, stage: str) -> Path:
        return self.root / f"round_{round_idx}" / f"{self.numbers[stage]:02d}_{stage}"

    def fingerprints(self, inputs: Inputs) -> dict[str, str | list[str]]:
        return {k: [self.input_fingerprint(p) for p in v] if isinstance(v, list) else self.input_fingerprint(v)
                for k, v in sorted(inputs.items())}

    def input_fingerprint(self, path: str) -> str:
        """A finished stage's output is known by the hash recorded when it finished; other inputs (a prompt
        file, a base model folder) by their content when small and by size + mtime when large."""
        for e in self.manifest["stages"]:
            for out in e["outputs"].values():
                if str(self.root / out) == str(path):
                    return e["output_hash"]
        p = Path(path)
        if not p.exists():
            return f"spec:{path}"  # a hub id or a spec that has no file of its own
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
        if sum(f.stat().st_size for f in files) <= (64 << 20):
            return tree_hash(p)
        return stable_hash([(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])

    def _is_redo(self, round_idx: int, stage: str) -> bool:
        return bool({"all", stage, f"round_{round_idx}/{stage}", f"round_{round_idx}"} & self.redo)

    # ---- running a stage --------------------------------------------------------------------------------------
    def run_stage(self, round_idx: int, stage: str, config: Any, inputs: Inputs) -> dict:
        """Run stage `stage` of round `round_idx` (its table row's `fn(config, inputs, work_dir)`) unless it already
        finished with the same config and inputs. `config` is the stage's typed config (a dataclass). Returns the
        stage's manifest entry; its `outputs` are paths relative to the run dir."""
        if stage not in self.stages:
            raise PosttrainError(f"unknown stage {stage!r}; the stage table has {list(self.stages)}")
        final = self.stage_dir(round_idx, stage)
        stage_id = f"round_{round_idx}/{stage}"
        if self.dry_run:
            return self._plan(round_idx, stage, config, inputs)
        input_hashes = self.fingerprints(inputs)
        recorded = plain(config)  # what stage_config.json holds: secrets redacted
        config_hash = _hash_recorded(recorded)
        old = self.entry(round_idx, stage)
        if old is not None:
            if old["config_hash"] == config_hash and old["input_hashes"] == input_hashes and not self._is_redo(
                round_idx, stage
            ):
                self._check_outputs(old, stage_id)
                return old
            # Redone automatically only when the config is the same and every changed input was remade by a
            # stage redone in this invocation; a hand-edited input or a new setting is the user's call.
            changed = [k for k in input_hashes if old["input_hashes"].get(k) != input_hashes[k]]
            inputs_remade = (
                old["config_hash"] == config_hash
                and bool(changed)
                and all(self._remade(old["input_hashes"].get(k), input_hashes[k]) for k in changed)
            )
            if not (self._is_redo(round_idx, stage) or inputs_remade):
                raise StageChanged(self._changed_message(stage_id, final, old, recorded, input_hashes))
            self._supersede(old, final)

        work = final.with_name(f".{final.name}{PARTIAL}")
        marker = {"config_hash": config_hash, "input_hashes": input_hashes}
        if final.exists():  # renamed into place but no manifest entry: the driver died in between. Kept, not wiped.
            self._set_aside(final, "orphan")
        keep_work = False
        if work.exists():
            keep_work = self.stages[stage].resumable and (work / ".stage.json").exists() and json.loads(
                (work / ".stage.json").read_text()
            ) == marker
            if not keep_work:
                shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        (work / "stage_config.json").write_text(json.dumps(recorded, indent=2, sort_keys=True))
        _write_json_atomic(work / ".stage.json", marker)

        start = time.time()
        print(f"== {stage_id}: {'resuming' if keep_work else 'started'} in {work}", flush=True)
        try:
            result = self.stages[stage].fn(config, inputs, work)
        except Exception as e:  # noqa: BLE001 - any failure is reported the same way, its traceback kept
            log = work / "error.log"
            with open(log, "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {stage_id}\n{traceback.format_exc()}")
            cause = str(e) if isinstance(e, PosttrainError) else f"{type(e).__name__}: {e}"
            raise StageError(f"stage {stage_id} failed: {cause}\n(traceback: {log})") from e
        for name, rel in result.outputs.items():
            if not (work / rel).exists():
                raise PosttrainError(f"stage {stage_id} did not produce its output '{name}' ({rel})")
        # What downstream stages consume: the declared outputs, not logs or timings.
        output_hash = stable_hash({name: tree_hash(work / rel) for name, rel in sorted(result.outputs.items())})
        os.replace(work, final)
        entry = {
            "round": round_idx,
            "stage": stage,
            "dir": str(final.relative_to(self.root)),
            "config_hash": config_hash,
            "inputs": {k: [self._relative(p) for p in v] if isinstance(v, list) else self._relative(v)
                       for k, v in sorted(inputs.items())},
            "input_hashes": input_hashes,
            "outputs": {k: str((final / v).relative_to(self.root)) for k, v in result.outputs.items()},
            "output_hash": output_hash,
            "output_sizes": _output_sizes(final, result.outputs),
            "rows": result.rows,
            "seconds": round(time.time() - start, 3),
            "metrics": result.metrics,
            "versions": versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.manifest["stages"].append(entry)
        _write_json_atomic(self.manifest_path, self.manifest)
        self._fresh_outputs.add(output_hash)
        self.ran.append(stage_id)
        print(f"== {stage_id}: finished in {entry['seconds']:.1f} s, rows {json.dumps(result.rows)}", flush=True)
        return entry

    def _remade(self, old: str | list[str] | None, new: str | list[str]) -> bool:
        """Whether an input that changed did so only because stages redone in this invocation remade it."""
        if isinstance(new, list):  # e.g. every round's SFT data: may grow, each element kept or remade
            before = list(old) if isinstance(old, list) else []
            return len(new) >= len(before) and all(
                h == b or h in self._fresh_outputs for h, b in zip(new, before)) and all(
                h in before or h in self._fresh_outputs for h in new[len(before):])
        return new in self._fresh_outputs

    def _plan(self, round_idx: int, stage: str, config: Any, inputs: Inputs) -> dict:
        """Dry run: print what run_stage would do and return a planned entry whose outputs are future paths."""
        import yaml

        stage_id = f"round_{round_idx}/{stage}"
        old = self.entry(round_idx, stage)
        paths = [p for v in inputs.values() for p in (v if isinstance(v, list) else [v])]
        planned_inputs = any(str(p).startswith(str(self.root)) and not Path(p).exists() for p in paths)
        finished = old is not None and old.get("planned") is None
        if finished and not self._is_redo(round_idx, stage) and not planned_inputs:
            same = old["config_hash"] == config_hash_of(config) and old["input_hashes"] == self.fingerprints(inputs)
            if same:
                print(f"== {stage_id}: done earlier, skipped")
                return old
            status = "finished with another config or inputs: the run would stop here (add redo=[...] to redo it)"
        else:
            status = "would redo" if old is not None else "would run"
        folder = self.stage_dir(round_idx, stage)
        print(f"== {stage_id}: {status}\n   folder: {folder}")
        for k, v in sorted(inputs.items()):
            for p in v if isinstance(v, list) else [v]:
                print(f"   input {k}: {self._relative(p)}")
        module = self.stages[stage].module
        if module is not None:
            from posttrain.train.launch import command

            print("   command: " + " ".join(command(module, folder / "train_config.json", plain(config)["launch"])))
        print("   config:\n" + "\n".join("     " + line for line in yaml.safe_dump(
            plain(config), sort_keys=True).splitlines()))
        entry = {"round": round_idx, "stage": stage, "planned": True,
                 "outputs": _PlannedOutputs(str(folder.relative_to(self.root)))}
        self.planned.append(entry)
        return entry

    def _relative(self, path: str) -> str:
        """Paths inside the run directory are recorded relative to it, so a run can move to another machine."""
        p = Path(path)
        return str(p.relative_to(self.root)) if p.is_absolute() and p.is_relative_to(self.root) else str(path)

    def output(self, entry: dict, name: str) -> str:
        return str(self.root / entry["outputs"][name])

    def _set_aside(self, final: Path, suffix: str = "") -> Path:
        """Move a stage folder to round_N/superseded/<name>.<time>[.suffix]; nothing finished is deleted."""
        base = final.parent / "superseded" / f"{final.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        base = base.with_name(f"{base.name}.{suffix}") if suffix else base
        dest, n = base, 1
        while dest.exists():  # two redos within one second
            dest, n = base.with_name(f"{base.name}.{n}"), n + 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            os.replace(final, dest)
        return dest

    def _check_outputs(self, entry: dict, stage_id: str) -> None:
        """A finished stage about to be skipped still has its outputs as they were written (file count and bytes:
        a stat, not a read, so a 140 GB checkpoint costs nothing); else the run stops naming the stage."""
        recorded = entry.get("output_sizes")
        if recorded is None:
            return
        relative = {name: str(Path(path).relative_to(entry["dir"])) for name, path in entry["outputs"].items()}
        now = _output_sizes(self.root / entry["dir"], relative)
        changed = sorted(name for name in recorded if now.get(name) != recorded[name])
        if changed:
            raise PosttrainError(
                f"stage {stage_id} finished, but its output(s) {changed} in {self.root / entry['dir']} were deleted or "
                f"changed since (files and bytes differ from the manifest). Restore them, or add redo=[{stage_id}] to "
                f"make them again (what is left moves to round_{entry['round']}/superseded/)")

    def _supersede(self, old: dict, final: Path) -> None:
        dest = self._set_aside(final)
        self.manifest["stages"].remove(old)
        self.manifest["superseded"].append({**old, "dir": str(dest.relative_to(self.root))})
        _write_json_atomic(self.manifest_path, self.manifest)

    def _changed_message(self, stage_id: str, final: Path, old: dict, recorded: dict, input_hashes: dict) -> str:
        old_cfg_path = final / "stage_config.json"
        old_cfg = json.loads(old_cfg_path.read_text()) if old_cfg_path.exists() else {}
        keys = _diff_keys(_hashed_part(old_cfg), _hashed_part(recorded))
        changed_inputs = [k for k in input_hashes if old["input_hashes"].get(k) != input_hashes[k]]
        what = []
        if keys:
            what.append("config keys " + ", ".join(keys))
        if changed_inputs:
            what.append("inputs " + ", ".join(changed_inputs))
        return (
            f"stage {stage_id} already finished in {final} with a different "
            f"{' and '.join(what) or 'config'}. Rerun with the original recipe to resume, or add "
            f"redo=[{stage_id}] to run it again (the finished folder is kept under {final.parent}/superseded/)."
        )

    def write_config(self, yaml_text: str, overrides: list[str] | tuple[str, ...] = ()) -> None:
        """Write the resolved recipe (already redacted) and the command line's overrides (redacted here) as
        overrides.yaml; an earlier, different config.yaml is kept in config.history/."""
        import yaml

        write_text_atomic(self.root / "overrides.yaml",
                           yaml.safe_dump([redact_override(o) for o in overrides], default_flow_style=False))
        path = self.root / "config.yaml"
        if path.exists() and path.read_text() != yaml_text:
            hist = self.root / "config.history"
            hist.mkdir(exist_ok=True)
            n = len(list(hist.glob("*.yaml"))) + 1
            os.replace(path, hist / f"{n:03d}.yaml")
        write_text_atomic(path, yaml_text)
