"""`backend_swaps`: a backend class name -> the config that replaces every backend naming it, across a round's
config (generate, evals, judges and other nested backends). Rehearsals on machines without CUDA swap vLLM for the
hf backend this way (recipes/rehearsal/cpu.yaml); stage configs then record the backend that actually runs."""

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


def _swap(node: Any, swaps: dict) -> Any:
    if isinstance(node, dict):
        if node.get("_target_") in swaps:
            return dict(swaps[node["_target_"]])
        return {k: v if k == "backend_swaps" else _swap(v, swaps) for k, v in node.items()}
    if isinstance(node, list):
        return [_swap(v, swaps) for v in node]
    return node
