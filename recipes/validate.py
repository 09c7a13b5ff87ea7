"""Check a whole recipe before the first stage runs, so a mistake surfaces in seconds and not in round 3.

Every round's config (the recipe with its `rounds` override merged) is checked: each `_target_` is on the
allowlist, importable and accepts its arguments; counts are positive and settings within range; every model
spec and prompt source resolves (prompt files are read and validated row by row). All problems are reported
at once, each naming its key.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

from posttrain import sources
from posttrain.config import Source, round_config
from posttrain.errors import PosttrainError
from posttrain.rundir import URL_CREDENTIALS
from posttrain.train.launch import command

ALLOWED_PREFIXES = ("posttrain.", "data_gen.", "reward.", "evals.")
_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}

_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_fraction = (lambda v: 0 <= v < 1, "must be in [0, 1)")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention", "paged_attention")
# TRL 1.16's DPOConfig.loss_type values (tests/recipes/test_validate.py reads TRL's own list to keep this in step).
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm")


DTYPES = ("auto", "float32", "bfloat16", "float16")  # the hf backend's (posttrain.models.inference_dtype)

def _optimizers() -> set[str]:
    from transformers.training_args import OptimizerNames

    return {o.value for o in OptimizerNames}


# What every training stage (sft, dpo, rm) takes: TrainingConfig's keys, checked alike for the three.
_TRAINING = {
    "learning_rate": _positive,
    "epochs": _positive,
    "batch_size": _positive,
    "grad_accum": _positive,
    "max_length": _positive,
    "save_steps": _positive,
    "logging_steps": _positive,
    "weight_decay": _non_negative,
    "warmup_ratio": _fraction,
    "eval_fraction": _fraction,
    "warmup_steps": _non_negative,
    "max_grad_norm": _non_negative,
    "optim": (lambda v: v in _optimizers(), "must be a transformers optimizer name (adamw_torch, adamw_torch_fused, "
                                            "adafactor, adamw_8bit, ...)"),
    "attn_implementation": (lambda v: v in ATTENTION or "/" in v,
                            f"must be one of {list(ATTENTION)} or a kernels-hub repo id"),
}


# key -> (predicate, what the predicate demands). String choices are Enums in the schema: Hydra rejects others.
CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "round": _positive,
    "data.num_prompts": _positive,
    "generate.shard_size": _positive,
    "generate.k": _positive,
    "generate.max_new_tokens": _positive,
    "generate.temperature": _non_negative,
    "generate.top_p": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "reward.batch_size": _positive,
    "select.min_margin": _non_negative,
    "select.max_similarity": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    **{f"{stage}.{key}": check for stage in ("sft", "dpo", "rm") for key, check in _TRAINING.items()},
    "sft.lora.r": _positive,
    "sft.lora.alpha": _positive,
    "dpo.lora.r": _positive,
    "dpo.lora.alpha": _positive,
    "dpo.beta": _positive,
    "dpo.loss_type": (lambda v: v in DPO_LOSSES, f"must be one of TRL's preference losses {list(DPO_LOSSES)}"),
    "dpo.label_smoothing": (lambda v: 0 <= v < 0.5, "must be in [0, 0.5)"),
    "evals.num_prompts": _positive,
    "generate.teacher_logprobs": _non_negative,
    "sft.kd.weight": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "sft.kd.temperature": _positive,
    "dpo.nll_weight": _non_negative,
    "rm.min_difference": _fraction,
    "evals.max_new_tokens": _positive,
    "evals.batch_size": _positive,
    "launch.nproc": _positive,
    "launch.nnodes": _positive,
    "launch.data.score_shard_rows": _positive,
    "launch.data.eval_shard_prompts": _positive,
}

DATA_STAGES = ("generate", "score", "eval")  # the stages launch.data.nproc may spread over processes


def _targets(node: Any, path: str = "", parent: Any = None):
    """Yield (key, dict, the mapping or list holding it) for every mapping with a `_target_` under `node`."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node, parent
        for k, v in node.items():
            yield from _targets(v, f"{path}.{k}" if path else str(k), node)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]", node)


# Never allowed as `allowed_targets` entries: the standard library (os, shutil, subprocess, builtins...) runs
# anything; a recipe names classes of posttrain or of the user's own package.
FORBIDDEN_PREFIXES = frozenset(sys.stdlib_module_names) | {"builtins", "posix", "nt", "hydra", "omegaconf"}


def allowed_prefix_problems(prefixes) -> list[str]:
    """Why entries of `allowed_targets` cannot be used: empty, private, or the standard library (which would let a
    recipe call os.system or shutil.rmtree)."""
    problems = []
    for i, prefix in enumerate(prefixes):
        top = str(prefix).strip().split(".")[0]
        if not top or not top.isidentifier():
            problems.append(f"allowed_targets[{i}]: {prefix!r} is not a module prefix (e.g. 'mypkg.')")
        elif top in FORBIDDEN_PREFIXES or top.startswith("_"):
            problems.append(f"allowed_targets[{i}]: {prefix!r} would allow the standard library or private "
                            f"modules; name your own package (e.g. 'mypkg.')")
    return problems


def _strings(node, path: str):
    """(key, value) of every string under `node`."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def check_target(key: str, node: dict, allowed: tuple[str, ...], injected: tuple[str, ...] = ()) -> str | None:
    """Why the `_target_` at `key` cannot be used, or None. `injected` are arguments posttrain passes itself."""
    target = node["_target_"]
    allowed = tuple(p if p.endswith(".") else f"{p}." for p in allowed if p)
    if isinstance(target, str) and any(part.startswith("_") for part in target.split(".")):
        return f"{key}._target_: {target!r} is private (a name starting with '_'); recipes may name public ones only"
    for where, value in _strings({k: v for k, v in node.items() if k != "_target_"}, key):
        if "${" in value:  # an escaped \${...} is text after resolution, and instantiate would resolve it again
            return (f"{where}: {value[:60]!r} would be resolved again when the object is built (an escaped "
                    f"interpolation, which could create a new `_target_`); write the value itself")
    if not isinstance(target, str) or not target.startswith(allowed):
        return (
            f"{key}._target_: {target!r} is not allowed; targets must start with one of {list(allowed)} "
            f"(add your package's prefix to `allowed_targets` to plug in your own class)"
        )
    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - any import failure is reported the same way
        return f"{key}._target_: cannot import {target!r} ({type(e).__name__}: {e})"
    module = getattr(obj, "__module__", None) or ""
    qualname = getattr(obj, "__qualname__", "")
    if not f"{module}.".startswith(allowed) or any(p.startswith("_") for p in f"{module}.{qualname}".split(".")):
        # e.g. posttrain.rundir.os.system is os.system; a public alias of a private helper is still the helper
        name = f"{module}.{getattr(obj, '__qualname__', obj)}"
        return f"{key}._target_: {target!r} resolves to {name}, which is not allowed"
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    unknown = sorted(set(node) - _HYDRA_KEYS - set(params))
    if unknown:
        return f"{key}: {target} takes no argument(s) {unknown} (it takes {sorted(set(params) - set(injected))})"
    required = {name for name, p in params.items() if p.default is p.empty
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    missing = sorted(required - set(node) - set(injected))
    # Only classes: a function reward is called with (prompts, responses), not built.
    if missing and inspect.isclass(obj) and not node.get("_partial_") and not node.get("_args_"):
        return f"{key}: {target} needs argument(s) {missing}, which nothing sets"
    return None


def _injected(key: str, parent: Any) -> tuple[str, ...]:
    """The arguments posttrain passes itself to the `_target_` at `key`: a stage's backend gets the model (and a
    journal folder); a nested `backend` its parent's `model` (reward.protocol.with_backend_models); the reward
    named `rm` the reward model this run trains."""
    if key in ("generate.backend", "evals.backend", "evals.teacher_backend") or key.startswith("backend_swaps."):
        return ("model", "journal_dir")
    if key.endswith(".backend"):
        return ("model",) if isinstance(parent, dict) and parent.get("model") else ()
    if key in ("reward.rewards.rm", "evals.rewards.rm"):
        return ("model",)
    return ()


def report_to_problems(key: str, names: list[str]) -> list[str]:
    """Trackers a training stage cannot report to: names transformers does not know, or whose package is not
    installed (checked before any stage runs, not when the Trainer starts)."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    known = set(INTEGRATION_TO_CALLBACK)
    unknown = [n for n in names if n not in known | {"none", "all"}]
    if unknown:
        return [f"{key}: {unknown} not a tracker transformers knows; use none, all or some of {sorted(known)}"]
    missing = [n for n in names if n in known and n not in get_available_reporting_integrations()]
    if missing:
        return [f"{key}: {missing} not installed here (pip install {' '.join(missing)}), or use report_to=[none]"]
    return []


def teacher_backend(rc: DictConfig) -> Any:
    """The backend config that answers as the teacher in round 0's eval: `evals.teacher_backend`, else the
    generate stage's backend when it serves the teacher (its endpoint, say), else `evals.backend`."""
    if rc.evals.get("teacher_backend") is not None:
        return rc.evals.teacher_backend
    own, evals = rc.generate.backend, rc.evals.backend

    def settings(node):
        return {k: v for k, v in node.items() if k != "batch_size"}
    if rc.generate.source == Source.teacher and settings(own) != settings(evals):
        return own  # the teacher's endpoint or engine (e.g. tensor-parallel), which evals.backend would not be
    return evals


def _remote(backend: Any) -> bool:
    """Whether a backend's `model` is a name a server knows (class attribute `remote`), not a local spec."""
    try:
        return bool(getattr(get_object(backend["_target_"]), "remote", False))
    except Exception:  # noqa: BLE001 - an unimportable target is reported on its own
        return False


def _round_problems(rc: DictConfig, where: str) -> list[str]:
    problems = []
    for key, (ok, demand) in CHECKS.items():
        value = OmegaConf.select(rc, key)
        if value is not None and not ok(value):
            problems.append(f"{where}{key}: {demand}, got {value!r}")
    problems += [where + p for p in allowed_prefix_problems(rc.allowed_targets)]
    for key in ("sft", "dpo", "rm"):
        problems += [where + p for p in report_to_problems(f"{key}.report_to", list(rc[key].report_to))]
    if rc.evals.report_to is not None:
        problems += [where + p for p in report_to_problems("evals.report_to", list(rc.evals.report_to))]
    allowed = ALLOWED_PREFIXES + tuple(p for p in rc.allowed_targets if not allowed_prefix_problems([p]))
    container = OmegaConf.to_container(rc, resolve=True)
    for key, value in _strings(container, ""):
        if URL_CREDENTIALS.search(value):
            problems.append(f"{where}{key}: a URL with credentials in it (user:password@); give the key through an "
                            f"environment variable (api_key_env) instead: it would be written into the run directory")
    for key, node, parent in _targets(container):
        injected = _injected(key, parent)
        problem = check_target(key, node, allowed, injected)
        if problem:
            problems.append(where + problem)
        elif node.get("_target_") == "reward.sandbox.CodeExecution" and node.get("allow_unsandboxed") is not True:
            from reward.sandbox import sandbox_problem

            why = sandbox_problem()
            if why:
                problems.append(f"{where}{key}: model code cannot be sandboxed here: {why}; fix that, or set "
                                f"{key}.allow_unsandboxed=true to run it with rlimits only")
    for name, node in rc.reward.rewards.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            problems.append(f"{where}reward.rewards.{name}: needs a `_target_` naming a Reward class or function")
    trained = {"rm"} if rc.rm.enabled else set()
    if rc.reward.primary is not None and rc.reward.primary not in set(rc.reward.rewards) | trained:
        problems.append(f"{where}reward.primary: {rc.reward.primary!r} is not one of reward.rewards "
                        f"{sorted(rc.reward.rewards)}")
    for name, node in (rc.evals.suites.items() if rc.evals.heldout else []):
        if node.get("_target_") == "evals.suites.WinRate" and "teacher" in node.get("against", ["teacher"]):
            if rc.teacher is None or not rc.evals.teacher:
                problems.append(f"{where}evals.suites.{name}: compares against the teacher, but there is no teacher "
                                f"(or evals.teacher=false); set `against: [previous, round0]`")
    has_reward = bool(rc.evals.rewards or rc.reward.rewards or rc.rm.enabled)
    for name, node in (rc.evals.suites.items() if rc.evals.heldout else []):
        judge = node.get("reward")
        if node.get("_target_") == "evals.suites.WinRate" and not has_reward and judge is None:
            problems.append(f"{where}evals.suites.{name}: a win rate needs a reward to judge with; set evals.rewards, "
                            f"reward.rewards or rm.enabled")
    for key in ("generate.backend", "evals.backend"):
        node = OmegaConf.select(rc, key)
        dtype = node.get("dtype", "auto") if node is not None else "auto"
        if node is not None and node.get("_target_") == "data_gen.hf_backend.HFBackend" and dtype not in DTYPES:
            problems.append(f"{where}{key}.dtype: {dtype!r} is not one of {list(DTYPES)}")
        if node is not None and node.get("_target_") == "data_gen.openai_backend.OpenAIBackend":
            env = node.get("api_key_env", "OPENAI_API_KEY")
            if env and not os.environ.get(env) and rc.dry_run:
                print(f"note: {key}.api_key_env: {env} is not set here; a real run needs it")
            elif env and not os.environ.get(env):
                problems.append(f"{where}{key}.api_key_env: the environment variable {env} holding the API key is "
                                f"not set (set api_key_env: null for a server that needs no key)")
    if rc.generate.source == Source.teacher and rc.teacher is None:
        problems.append(f"{where}generate.source: 'teacher' needs a `teacher` model (teacher=... or teacher.path=...)")
    return problems + _kd_problems(rc, where)


def _kd_problems(rc: DictConfig, where: str) -> list[str]:
    """Token-level distillation's settings agree: the teacher's log-probs are collected where they are trained on,
    from a teacher, and can be read as the student's token ids (the vocabulary check itself: `kd_vocabulary`)."""
    problems = []
    k, kd = rc.generate.teacher_logprobs, rc.sft.kd.weight
    if k and rc.generate.source != Source.teacher:
        problems.append(f"{where}generate.teacher_logprobs: {k} collects a teacher's log-probs, but generate.source is "
                        f"{rc.generate.source.value!r}; set generate.source=teacher or generate.teacher_logprobs=0")
    if kd and rc.sft.enabled and not k:
        problems.append(f"{where}sft.kd.weight: {kd} trains on the teacher's log-probs, which are not collected: set "
                        f"generate.teacher_logprobs (e.g. 20), or sft.kd.weight=0 for sequence-level distillation")
    if kd and rc.sft.packing:
        problems.append(f"{where}sft.kd: token-level distillation does not pack sequences; set sft.packing=false")
    backend = rc.generate.backend
    target = backend.get("_target_")
    if k > 20 and target == "data_gen.vllm_backend.VLLMBackend" and (backend.get("max_logprobs") or 20) < k:
        problems.append(f"{where}generate.backend.max_logprobs: vLLM's engine returns at most 20 log-probs a token "
                        f"unless started with more; set generate.backend.max_logprobs={k}")
    if k and target == "data_gen.hf_backend.HFBackend" and backend.get("prefix_sharing") is False:
        problems.append(f"{where}generate.backend.prefix_sharing: the hf backend collects top-k log-probs in its "
                        f"decoding loop; set prefix_sharing=true (the default)")
    if k and target == "data_gen.openai_backend.OpenAIBackend" and not backend.get("tokenizer"):
        problems.append(f"{where}generate.backend.tokenizer: generate.teacher_logprobs={k} from an endpoint needs a "
                        f"local tokenizer of the teacher's vocabulary to read its tokens as ids; set it to the "
                        f"student's (${{model.path}}), which must share that vocabulary")
    return problems


def kd_vocabulary(rounds: list[DictConfig], unusable: set) -> list[str]:
    """Each round that collects a teacher's log-probs: its teacher's tokenizer (or, for a served teacher, the
    tokenizer its endpoint's tokens are read with) maps every token to the same id as the student's."""
    from data_gen.logprobs import SEQUENCE_LEVEL_HINT, same_vocabulary
    from posttrain.models import load_tokenizer

    problems, seen = [], set()
    for r, rc in enumerate(rounds, 1):
        if not rc.generate.teacher_logprobs or rc.generate.source != Source.teacher or rc.teacher is None:
            continue
        remote = _remote(rc.generate.backend)
        key, spec = (("generate.backend.tokenizer", rc.generate.backend.get("tokenizer")) if remote
                     else ("teacher.path", rc.teacher.path))
        if not spec or (spec, rc.model.path) in seen or {spec, rc.model.path} & unusable:
            continue
        seen.add((spec, rc.model.path))
        if remote:
            print(f"note: round {r}: the endpoint's top-k tokens are read with {spec} and checked, reply by reply, "
                  f"to spell the teacher's text")
        if spec == rc.model.path:
            continue
        try:
            differs = same_vocabulary(load_tokenizer(spec), load_tokenizer(rc.model.path))
        except Exception as e:  # noqa: BLE001 - a tokenizer that does not load is the problem to report
            problems.append(f"{key}: its tokenizer does not load ({type(e).__name__}: {e})")
            continue
        if differs:
            problems.append(f"{key}: generate.teacher_logprobs needs the teacher's vocabulary to be the student's "
                            f"(model.path={rc.model.path}), and it is not: {differs}. {SEQUENCE_LEVEL_HINT[0].upper()}"
                            f"{SEQUENCE_LEVEL_HINT[1:]}")
    return problems


def _prompt_limit(model: str, max_prompt_tokens: int | None, max_new_tokens: int) -> int | None:
    """data.max_prompt_tokens, or the model's context (config.json's max_position_embeddings) minus the answer."""
    if max_prompt_tokens is not None:
        return max_prompt_tokens
    from posttrain.models import resolve_model

    config = os.path.join(resolve_model(model), "config.json")
    if not os.path.isfile(config):
        return None  # a hub id not downloaded yet
    import json

    with open(config) as f:
        context = json.load(f).get("max_position_embeddings")
    return context - max_new_tokens if context else None


def _long_prompts(model: str, prompts: list[dict], limit: int, source: str) -> list[str]:
    """Prompts whose chat-templated tokens exceed `limit`, named (a 50 MB prompt would otherwise be allocated)."""
    if not prompts:
        return []
    from posttrain.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    chars_per_token_floor = 32  # no tokenizer makes a token of more characters: longer text needs no encoding
    long = []
    for p in prompts:
        text = sum(len(m["content"]) for m in p["messages"])
        if text > limit * chars_per_token_floor or len(
                tokenizer.apply_chat_template(p["messages"], add_generation_prompt=True)["input_ids"]) > limit:
            long.append(p["prompt_id"])
    if not long:
        return []
    return [f"data.prompts: {len(long)} prompt(s) of {source} are longer than {limit} tokens with the chat template "
            f"(the model's context minus generate.max_new_tokens, or data.max_prompt_tokens): "
            f"{long[:5]}{' ...' if len(long) > 5 else ''}; remove them or raise data.max_prompt_tokens"]


def training_prompts(rc: DictConfig) -> list:
    """data.prompts' sources as the eval stage checks them against the held-out set: local paths, and mappings
    where a source has columns, a weight or its own split."""
    import dataclasses

    specs = [dataclasses.replace(s, path=sources.fingerprint_path(s)).spec()
             for s in sources.parse_sources(rc.data.prompts, "data.prompts", rc.data.split)]
    return sorted({repr(x): x for x in specs}.values(), key=repr)


def _prompt_problems(cfg: DictConfig, rounds: list[DictConfig], unusable: set) -> list[str]:
    """Every round's prompt pool loads and validates row by row, gives each round the prompts it asks for (per
    source, by weight), and fits the policy's context."""
    from data_gen.prompts import PromptError, load_pools, shares

    problems, pools, start, mixes, keys = [], {}, 0, [], []
    for r, rc in enumerate(rounds, 1):
        value = OmegaConf.to_container(rc.data, resolve=True)["prompts"]
        key = repr((value, rc.data.on_empty, rc.data.split))
        keys.append(key)
        mixes.append(value if isinstance(value, list) and len(value) > 1 else None)
        if r > 1 and (mixes[-1] or mixes[-2]) and mixes[-1] != mixes[-2]:
            problems.append(f"round {r}: data.prompts mixes several sources and differs from round {r - 1}'s; each "
                            f"source keeps its place in its own prompt stream only while the sources and weights stay "
                            f"the same: keep one data.prompts for every round")
        if key not in pools:
            try:
                pools[key] = load_pools(value, rc.data.on_empty, rc.data.split)
            except PromptError as e:
                pools[key] = None
                problems.append(f"data.prompts: {e}" if not str(e).startswith("data.prompts") else str(e))
        found = pools[key]
        n = rc.data.num_prompts
        if found is not None and n > 0:
            weights = [s.weight for s, _ in found]
            counts = [b - a for a, b in zip(shares(weights, start), shares(weights, start + n))]
            for (source, pool), count in zip(found, counts):
                if count > len(pool.prompts):
                    share = f"its share ({count}) of " if len(found) > 1 else ""
                    problems.append(f"round {r}: data.num_prompts={n} asks for {share}more prompts than {source} has "
                                    f"({len(pool.prompts)} usable); lower data.num_prompts or add prompts")
        start += max(n, 0)
    for key, found in pools.items():
        if found is None or cfg.dry_run or cfg.model.path in unusable:
            continue  # a dry run loads nothing, tokenizers included; an unusable model.path is reported on its own
        limits = [limit for rc, round_key in zip(rounds, keys) if round_key == key
                  if (limit := _prompt_limit(cfg.model.path, rc.data.max_prompt_tokens,
                                             rc.generate.max_new_tokens)) is not None]
        if limits:
            for source, pool in found:
                try:
                    problems += _long_prompts(cfg.model.path, pool.prompts, min(limits), str(source))
                except OSError as e:  # the folder resolves but its tokenizer does not load
                    problems.append(f"model.path: {cfg.model.path!r}: its tokenizer does not load ({e})")
                    break
    return problems


def _user_data_problems(cfg: DictConfig, rounds: list[DictConfig]) -> tuple[list[str], dict[str, str]]:
    """Every source of sft.data, dpo.data and rm.data (of the rounds whose stage runs) read and checked row by
    row, so a bad row stops the run before its first stage, named by key, file, row and column. Returns the
    problems and the sources' prompts (normalised text -> the source), for the held-out check."""
    from evals.stage import prompt_text

    problems, seen, prompts = [], set(), {}
    for rc in rounds:
        for stage, kind in (("sft", "sft"), ("dpo", "pairs"), ("rm", "ranked")):
            if not rc[stage].enabled:
                continue
            try:
                found = sources.parse_sources(rc[stage].data, f"{stage}.data")
            except sources.SourceError as e:
                problems.append(str(e))
                continue
            for source in found:
                if repr((source.spec(), kind)) in seen:
                    continue
                seen.add(repr((source.spec(), kind)))
                if cfg.dry_run:
                    try:
                        sources.locate(source)
                    except sources.SourceError as e:
                        print(f"note: {e}; a real run needs it")
                    continue
                try:
                    rows, _ = sources.read(source, kind)
                except sources.SourceError as e:
                    problems.append(str(e))
                    continue
                for row in rows:
                    prompts.setdefault(prompt_text(row["messages"]), str(source))
    return problems, prompts


def _heldout_problems(rounds: list[DictConfig], user_prompts: dict[str, str]) -> list[str]:
    """Held-out prompt sets (evals.heldout and suites' own `prompts`) must exist and share nothing with the
    prompts of any round, nor with the prompts of the user's training sets (`user_prompts`: text -> source)."""
    from data_gen.prompts import PromptError, load_prompts
    from evals.stage import check_heldout, prompt_text

    training = []
    for rc in rounds:
        try:
            training += [s for s in training_prompts(rc) if os.path.exists(s if isinstance(s, str) else s["path"])]
        except PosttrainError:
            continue  # reported with data.prompts
    sets = {("evals.heldout", rc.evals.heldout, rc.evals.split) for rc in rounds if rc.evals.heldout}
    sets |= {(f"evals.suites.{n}.prompts", s.prompts, s.get("split", "train"))
             for rc in rounds for n, s in rc.evals.suites.items() if s.get("prompts")}
    problems = []
    for key, source, split in sorted(sets):
        try:
            heldout = load_prompts(source, split=split).prompts
            check_heldout(heldout, training, "train")
        except (PromptError, PosttrainError) as e:
            problems.append(f"{key}: {e}")
            continue
        clashes = [(p["prompt_id"], user_prompts[text]) for p in heldout
                   if (text := prompt_text(p["messages"])) in user_prompts]
        if clashes:
            problems.append(f"{key}: {len(clashes)} held-out prompt(s) are also prompts of your training data, e.g. "
                            f"{clashes[0][0]!r} in {clashes[0][1]}; held-out prompts must never be trained on")
    return problems


def unresolved(node: Any, path: str = "") -> list[str]:
    """Every value of the recipe whose interpolation cannot be resolved, above all an environment variable a recipe
    reads with no default (`${oc.env:POSTTRAIN_PROMPTS}`: real data, never a silent stand-in), named with its key."""
    import re

    from omegaconf import ListConfig
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    problems = []
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node)) if isinstance(node, ListConfig) else []
    for k in keys:
        key = f"{path}[{k}]" if isinstance(node, ListConfig) else f"{path}.{k}" if path else str(k)
        if key == "hydra":
            continue
        try:
            value = node[k]
        except InterpolationResolutionError as e:
            env = re.search(r"Environment variable '([^']+)' not found", str(e))
            problems.append(f"{key}: the environment variable {env.group(1)} is not set; export it (the recipe reads "
                            f"{key} from it) or pass {key}=..." if env else
                            f"{key}: {str(e).splitlines()[0]}")
            continue
        except MissingMandatoryValue:
            problems.append(f"{key}: required and not set (pass {key}=...)")
            continue
        problems += unresolved(value, key)
    return problems


def validate(cfg: DictConfig) -> list[DictConfig]:
    """Validate the recipe for rounds 1..cfg.round. Returns the per-round configs; raises PosttrainError
    listing every problem found."""
    from posttrain.models import check_model_spec

    problems: list[str] = unresolved(cfg)
    if problems:
        raise PosttrainError("invalid recipe:\n  - " + "\n  - ".join(problems))
    rounds: list[DictConfig] = []
    notes: list[str] = []
    if cfg.round < 1:
        raise PosttrainError(f"round: must be >= 1, got {cfg.round}")
    for r in range(0, cfg.round + 1):  # round 0: the recipe without any `rounds` override
        try:
            rc = round_config(cfg, r, notes)
        except Exception as e:  # noqa: BLE001 - OmegaConf's message names the key
            problems.append(f"{f'rounds[{r - 1}]' if r else 'recipe'}: {e}".replace("\n", " "))
            if r == 0:
                break
            continue
        if r:
            rounds.append(rc)
    if problems:
        raise PosttrainError("invalid recipe:\n  - " + "\n  - ".join(problems))
    for note in dict.fromkeys(notes):
        print(f"note: {note}")

    for r, rc in enumerate(rounds, 1):
        where = f"round {r}: " if r <= len(cfg.rounds) else ""
        problems += [p for p in _round_problems(rc, where) if p not in problems]

    specs = {("model.path", cfg.model.path)}
    specs |= {("rm.model", rc.rm.model) for rc in rounds if rc.rm.enabled and rc.rm.model}
    specs |= {("teacher.path", rc.teacher.path) for rc in rounds
              if rc.teacher and rc.generate.source == Source.teacher and not _remote(rc.generate.backend)}
    first = rounds[0]
    if first.teacher and first.evals.heldout and first.evals.teacher and not _remote(teacher_backend(first)):
        specs.add(("teacher.path", first.teacher.path))  # round 0's eval answers with it
    unusable = set()  # specs already reported: nothing more is measured with them
    for key, spec in sorted(specs):
        try:
            check_model_spec(spec, key)
        except ValueError as e:
            unusable.add(spec)
            hub_id = not spec.startswith(("/", ".", "~", "pkg://", "tiny://")) and not os.path.exists(spec)
            if cfg.dry_run and hub_id:  # a dry run plans on a machine that need not hold the weights
                print(f"note: {key}={spec!r} is a hub id not in the local cache; a real run downloads it")
            else:
                problems.append(str(e))
    problems += _prompt_problems(cfg, rounds, unusable)
    problems += kd_vocabulary(rounds, unusable)
    found, user_prompts = _user_data_problems(cfg, rounds)
    problems += found
    first = rounds[0]
    if first.rm.enabled and first.reward.primary == "rm" and not first.reward.rewards and not first.rm.data:
        problems.append("rm.data: round 1 has nothing to score its samples with (its reward model trains on earlier "
                        "rounds' pairs and there are none yet): add rm.data or a reward in reward.rewards")
    for r, rc in enumerate(rounds, 1):
        if rc.dpo.enabled and (rc.reward.rewards or rc.rm.enabled) and rc.generate.k < 2:
            problems.append(f"round {r}: generate.k={rc.generate.k} gives no DPO pairs (a pair needs two answers to "
                            f"one prompt): set generate.k >= 2 or dpo.enabled=false")
            break
    for rc in rounds:
        try:
            command("posttrain.train.sft", "train_config.json", OmegaConf.to_container(rc.launch, resolve=True))
        except PosttrainError as e:
            problems.append(f"launch: {e}")
            break
    if first.rm.scorer:
        import inspect

        from reward.rm_scorer import RewardModelScorer

        known = set(inspect.signature(RewardModelScorer).parameters) - {"model"}
        unknown = sorted(set(first.rm.scorer) - known)
        if unknown:
            problems.append(f"rm.scorer: {unknown} are not arguments of reward.rm_scorer.RewardModelScorer "
                            f"({sorted(known)})")
    for stage, nproc in first.launch.data.nproc.items():
        if stage not in DATA_STAGES:
            problems.append(f"launch.data.nproc.{stage}: not a data stage; the stages that run on several processes "
                            f"are {list(DATA_STAGES)}")
        elif not isinstance(nproc, int) or nproc < 1:
            problems.append(f"launch.data.nproc.{stage}={nproc!r}: must be a whole number of processes >= 1")
    problems += _heldout_problems(rounds, user_prompts)
    if problems:
        raise PosttrainError("invalid recipe:\n  - " + "\n  - ".join(problems))
    return rounds
