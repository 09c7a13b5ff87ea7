"""Checkpoint averaging (Llama 3, section 4.1.5: models from different data versions or hyperparameters are
averaged at the RM, SFT and DPO stages).

`average_checkpoints(paths, out_dir, weights)` averages N Hugging Face folders of the same architecture tensor
by tensor, straight from their safetensors files, so memory holds one tensor per checkpoint at a time, not N
models. The output keeps the first checkpoint's shard layout, config and tokenizer. Also a command:

    python -m posttrain.average OUT_DIR CKPT_A CKPT_B [...] [--weights 0.5 0.25 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from posttrain.errors import PosttrainError


def _shards(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name of an HF folder (single file or indexed shards)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["weight_map"]
    single = folder / "model.safetensors"
    if not single.exists():
        raise PosttrainError(f"{folder} has no model.safetensors (or index): not a safetensors HF model folder")
    with safe_open(str(single), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def average_checkpoints(paths: list[str | Path], out_dir: str | Path, weights: list[float] | None = None) -> Path:
    """Write the weighted average of the checkpoints in `paths` to `out_dir` (uniform when `weights` is None;
    weights are normalised to sum to 1). Raises PosttrainError when the checkpoints differ in tensors or shapes."""
    folders = [Path(p) for p in paths]
    if not folders:
        raise PosttrainError("average_checkpoints needs at least one checkpoint")
    weights = [1.0] * len(folders) if weights is None else [float(w) for w in weights]
    if len(weights) != len(folders) or sum(weights) <= 0:
        raise PosttrainError(f"{len(weights)} weights for {len(folders)} checkpoints (they must match and sum > 0)")
    weights = [w / sum(weights) for w in weights]
    maps = [_shards(f) for f in folders]
    for f, m in zip(folders[1:], maps[1:]):
        if set(m) != set(maps[0]):
            diff = sorted(set(m) ^ set(maps[0]))[:5]
            raise PosttrainError(
                f"{f} and {folders[0]} hold different tensors (e.g. {diff}): not the same architecture")

    out = Path(out_dir)
    if out.exists():
        raise PosttrainError(f"{out} already exists; averaging never overwrites a folder")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    handles: dict[tuple[int, str], object] = {}

    def tensor(i: int, name: str) -> torch.Tensor:
        key = (i, maps[i][name])
        if key not in handles:
            handles[key] = safe_open(str(folders[i] / maps[i][name]), "pt")
        return handles[key].get_tensor(name)

    by_shard: dict[str, list[str]] = {}
    for name, shard in maps[0].items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        averaged = {}
        for name in names:
            first = tensor(0, name)
            acc = first.to(torch.float64) * weights[0]
            for i in range(1, len(folders)):
                t = tensor(i, name)
                if t.shape != first.shape:
                    raise PosttrainError(
                        f"tensor {name}: shape {tuple(t.shape)} in {folders[i]} vs {tuple(first.shape)}")
                acc += t.to(torch.float64) * weights[i]
            averaged[name] = acc.to(first.dtype).contiguous()
        save_file(averaged, str(tmp / shard), metadata={"format": "pt"})
    for item in folders[0].iterdir():  # config, generation config, tokenizer, shard index
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy2(item, tmp / item.name)
    (tmp / "averaged_from.json").write_text(
        json.dumps({"checkpoints": [str(f) for f in folders], "weights": weights}, indent=2)
    )
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m posttrain.average", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--weights", nargs="+", type=float)
    args = parser.parse_args(argv)
    print(average_checkpoints(args.checkpoints, args.out_dir, args.weights))


if __name__ == "__main__":
    main()

