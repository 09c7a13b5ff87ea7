"""Backend configs as a round receives them.

`backend_swaps`: a backend class name -> the config that replaces every backend naming it, across a round's
config (generate, evals, judges and other nested backends). Rehearsals on machines without CUDA swap vLLM for the
hf backend this way (recipes/rehearsal/cpu.yaml); stage configs then record the backend that actually runs.

Own settings only: Hydra merges a recipe's layers key by key, so a derived recipe that switches
`generate.backend._target_` (hf -> an endpoint) would inherit the hf backend's `batch_size` from the recipe below
it. A setting of one of posttrain's other backends that the chosen class does not take is left out (and reported
by validation); a key no backend takes is still an error."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def with_backend_swaps(rc: DictConfig) -> DictConfig:
    """`rc` (a typed round config) with its `backend_swaps` applied; `rc` itself when it has none."""
    if not rc.backend_swaps:
        return rc
    from posttrain.config import PosttrainConfig

    swaps = OmegaConf.to_container(rc.backend_swaps, resolve=True)
    swapped = _swap(OmegaConf.to_container(rc, resolve=False), swaps)
    return OmegaConf.merge(OmegaConf.structured(PosttrainConfig), swapped)


# posttrain's own backend classes, by name (their settings are what may leak from a recipe's lower layers).
KNOWN_BACKENDS = ("data_gen.hf_backend.HFBackend", "data_gen.vllm_backend.VLLMBackend",
                  "data_gen.openai_backend.OpenAIBackend")


def _parameters(target: str) -> set[str] | None:
    """The keyword arguments a class takes; None when it does not import or takes **kwargs."""
    import inspect

    from hydra.utils import get_object

    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # noqa: BLE001 - an unimportable target is validation's to report
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def with_own_settings(rc: DictConfig, notes: list[str] | None = None) -> DictConfig:
    """`rc` without, in each backend config (a `_target_` node under a key ending in `backend`), the settings of
    another of posttrain's backends that its class does not take; each one left out is described in `notes`."""
    from posttrain.config import PosttrainConfig

    others = {}
    plain = OmegaConf.to_container(rc, resolve=False)
    dropped: list[str] = []

    def clean(node: Any, key: str) -> Any:
        if isinstance(node, dict):
            target = node.get("_target_")
            if key.rsplit(".", 1)[-1].endswith("backend") and isinstance(target, str):
                own = _parameters(target)
                if own is not None:
                    if not others:
                        others.update({t: _parameters(t) or set() for t in KNOWN_BACKENDS})
                    for k in [k for k in node if not k.startswith("_") and k not in own]:
                        owners = [t.rsplit(".", 1)[-1] for t, names in others.items() if k in names]
                        if owners:
                            dropped.append(f"{key}.{k} is a setting of {'/'.join(owners)}, not of "
                                           f"{target.rsplit('.', 1)[-1]}: left out")
                            node = {n: v for n, v in node.items() if n != k}
            return {k: clean(v, f"{key}.{k}" if key else k) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(node)]
        return node

    cleaned = clean(plain, "")
    if not dropped:
        return rc
    if notes is not None:
        notes += dropped
    return OmegaConf.merge(OmegaConf.structured(PosttrainConfig), cleaned)


def _swap(node: Any, swaps: dict) -> Any:
    if isinstance(node, dict):
        if node.get("_target_") in swaps:
            return dict(swaps[node["_target_"]])
        return {k: v if k == "backend_swaps" else _swap(v, swaps) for k, v in node.items()}
    if isinstance(node, list):
        return [_swap(v, swaps) for v in node]
    return node
