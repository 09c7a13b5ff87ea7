"""`posttrain-export RUN_DIR --out DIR`: a round's data as a dataset TRL and `datasets` read unchanged.

    posttrain-export runs/default --what pairs --out exported/pairs           # the last round's DPO pairs
    posttrain-export runs/default --round 1 --what sft --format parquet --out exported/sft_r1
    posttrain-export runs/default --what pairs --out exported/pairs --push-to-hub me/my-pairs

What is written (TRL's conversational formats; prompts are message lists, answers one assistant message):

    sft          prompt, completion              the round's SFT set (best-of-K), or its generations without select
    pairs        prompt, chosen, rejected        the round's DPO pairs, with chosen_score, rejected_score, margin
    generations  prompt, completion              every sample, with its sample_idx, finish_reason and rewards
    eval         prompt, completion              the held-out answers of the round's policy (round 0: the start)

Every row keeps its prompt_id and round. The folder holds `data/train.jsonl` (or `.parquet`) and a dataset card,
`README.md` (`datasets.load_dataset(DIR)` finds the data by its name), whose text records the model,
the teacher, the rewards, K, the round and the counts, read from the run directory. An existing, non-empty --out is
refused: an export never overwrites.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from posttrain.errors import PosttrainError

WHAT = {  # --what -> (stage, output), tried in order
    "sft": [("select", "sft"), ("generate", "generations")],
    "pairs": [("select", "pairs")],
    "generations": [("score", "scored"), ("generate", "generations")],
    "eval": [("eval", "responses")],
}
KEEP = ("prompt_id", "round", "sample_idx", "finish_reason", "score", "chosen_score", "rejected_score", "margin")


def _manifest(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "manifest.json").read_text())
    except FileNotFoundError:
        raise PosttrainError(f"{run_dir}: no manifest.json; is it a posttrain run directory?") from None


def find(run_dir: Path, what: str, round_idx: int | None) -> tuple[dict, str]:
    """(the manifest entry, the output name) holding `what` for `round_idx` (None: the last round that has it)."""
    entries = _manifest(run_dir)["stages"]
    rounds = sorted({e["round"] for e in entries}, reverse=True) if round_idx is None else [round_idx]
    for r in rounds:
        done = {e["stage"]: e for e in entries if e["round"] == r}
        if what == "sft" and "select" not in done and ("score" in done or _has_rewards(run_dir)):
            continue  # a round whose best-of-K selection has not finished: its raw samples are not an SFT set
        for stage, output in WHAT[what]:
            if stage in done and output in done[stage]["outputs"]:
                return done[stage], output
    where = f"round {round_idx}" if round_idx is not None else "any round"
    raise PosttrainError(f"{run_dir}: {where} has no finished {' or '.join(s for s, _ in WHAT[what])} stage to "
                         f"export {what} from")


def _has_rewards(run_dir: Path) -> bool:
    """Whether the run's recipe scores its samples (so its SFT set is the select stage's, never raw samples)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except OSError:
        return True
    return bool((config.get("reward") or {}).get("rewards"))


def rows(ds, what: str):
    """Stage rows -> TRL conversational rows, with the columns of KEEP and every reward score."""
    for row in ds:
        extra = {k: row[k] for k in row if k in KEEP or k.startswith("reward.")}
        prompt = list(row["messages"])
        if what == "pairs":
            yield {"prompt": prompt, "chosen": [{"role": "assistant", "content": row["chosen"]}],
                   "rejected": [{"role": "assistant", "content": row["rejected"]}], **extra}
        else:
            yield {"prompt": prompt, "completion": [{"role": "assistant", "content": row["text"]}], **extra}


def _card(run_dir: Path, entry: dict, what: str, data_file: str, count: int) -> str:
    import yaml

    manifest = _manifest(run_dir)["stages"]
    r = entry["round"]
    generate = next((e for e in manifest if (e["round"], e["stage"]) == (r, "generate")), None)
    score = next((e for e in manifest if (e["round"], e["stage"]) == (r, "score")), None)

    def stage_config(e):
        try:
            return json.loads((run_dir / e["dir"] / "stage_config.json").read_text()) if e else {}
        except (OSError, ValueError):
            return {}

    gen_cfg, score_cfg = stage_config(generate), stage_config(score)
    gen_cfg = gen_cfg.get("generate", gen_cfg)  # the GenerateJob: the round's generate section inside
    config = {}
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except OSError:
        pass
    facts = {
        "run directory": run_dir.name,
        "round": r,
        "exported": what,
        "rows": count,
        "student (model.path)": (config.get("model") or {}).get("path"),
        "teacher (teacher.path)": (config.get("teacher") or {}).get("path"),
        "generated by": generate["inputs"].get("model") if generate else None,
        "generate.source": gen_cfg.get("source"),
        "K (generate.k)": gen_cfg.get("k"),
        "temperature": gen_cfg.get("temperature"),
        "rewards": ", ".join(f"{name} ({node.get('_target_')})" for name, node in
                             (score_cfg.get("rewards") or {}).items()) or None,
        "stage rows": json.dumps(entry["rows"]),
        "posttrain": (entry.get("versions") or {}).get("posttrain"),
    }
    # No `configs` block: `datasets` finds data/train.* by name, and keys its cache on the files' modification times
    # (with a `configs` block it keys on the folder name and patterns, so a second export named alike reads the
    # first one's cached rows).
    header = {"tags": ["posttrain", "trl", {"pairs": "dpo"}.get(what, "sft")]}
    table = "\n".join(f"| {k} | {v} |" for k, v in facts.items() if v is not None)
    use = ("DPOTrainer(model=..., train_dataset=dataset)" if what == "pairs"
           else "SFTTrainer(model=..., train_dataset=dataset)")
    return (f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
            f"# {what} from posttrain run `{run_dir.name}`, round {r}\n\n"
            f"Exported with `posttrain-export` from `{entry['dir']}` (TRL's conversational "
            f"{'preference' if what == 'pairs' else 'prompt-completion'} format).\n\n"
            f"| | |\n|---|---|\n{table}\n\n"
            f"```python\nfrom datasets import load_dataset\n\n"
            f"dataset = load_dataset(\"path/or/repo\", split=\"train\")\n"
            f"trainer = {use}\n```\n")


def export(run_dir: str | Path, out: str | Path, what: str = "sft", round_idx: int | None = None,
           fmt: str = "jsonl") -> Path:
    """Write `what` of round `round_idx` of `run_dir` to the new folder `out`; returns it."""
    import datasets

    if what not in WHAT:
        raise PosttrainError(f"--what must be one of {sorted(WHAT)}, not {what!r}")
    if fmt not in ("jsonl", "parquet"):
        raise PosttrainError(f"--format must be jsonl or parquet, not {fmt!r}")
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PosttrainError(f"{out} exists and is not empty; an export never overwrites: name a new folder")
    entry, output = find(run_dir, what, round_idx)
    ds = datasets.load_from_disk(str(run_dir / entry["outputs"][output]))
    exported = list(rows(ds, what))
    data_file = f"data/train.{fmt}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # beside --out: the rename stays on its disk
    try:
        (tmp / "data").mkdir()
        table = datasets.Dataset.from_list(exported)
        if fmt == "jsonl":
            table.to_json(str(tmp / data_file), lines=True, force_ascii=False)
        else:
            table.to_parquet(str(tmp / data_file))
        (tmp / "README.md").write_text(_card(run_dir, entry, what, data_file, len(exported)))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder as a hub dataset repo (needs network and a token: `hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise PosttrainError("--push-to-hub: HF_HUB_OFFLINE=1 is set; the export is on disk, push it when online")
    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="posttrain-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", required=True, help="a new folder")
    parser.add_argument("--what", default="sft", choices=sorted(WHAT))
    parser.add_argument("--round", type=int, default=None, help="default: the last round that has it")
    parser.add_argument("--format", default="jsonl", choices=("jsonl", "parquet"))
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None)
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    try:
        folder = export(args.run_dir, args.out, args.what, args.round, args.format)
        print(f"{folder}: {args.what} in TRL's format; load with datasets.load_dataset({str(folder)!r})")
        if args.push_to_hub:
            print(f"pushed: {push(folder, args.push_to_hub, args.private)}")
    except PosttrainError as e:
        sys.exit(f"posttrain-export: {e}")


if __name__ == "__main__":
    main()
