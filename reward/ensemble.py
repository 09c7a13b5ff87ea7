"""A weighted ensemble of rewards, itself a Reward."""

from __future__ import annotations

from collections.abc import Callable


class WeightedEnsemble:
    """Weighted sum of several rewards, each called once per batch.

    `rewards` maps names to rewards (in a recipe, nested `_target_` configs that Hydra builds); `weights` maps
    the same names to weights (default 1 each). A component that cannot score a response (None) is left out and
    the other weights are renormalised, unless `require_all=True`, where any None makes the total None.

    >>> longer = lambda prompts, responses: [float(len(r)) for r in responses]
    >>> polite = lambda prompts, responses: [1.0 if "please" in r else 0.0 for r in responses]
    >>> WeightedEnsemble({"len": longer, "polite": polite}, {"len": 0.5, "polite": 2.0})([{}, {}], ["ab", "please"])
    [1.0, 5.0]
    """

    def __init__(
        self,
        rewards: dict[str, Callable],
        weights: dict[str, float] | None = None,
        require_all: bool = False,
    ):
        if not rewards:
            raise ValueError("WeightedEnsemble needs at least one reward")
        weights = dict(weights or {})
        unknown = set(weights) - set(rewards)
        if unknown:
            raise ValueError(
                f"WeightedEnsemble weights name unknown rewards {sorted(unknown)}; rewards: {sorted(rewards)}")
        self.rewards = rewards
        self.weights = {name: float(weights.get(name, 1.0)) for name in rewards}
        self.require_all = require_all

    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]:
        parts = {name: list(fn(prompts, responses)) for name, fn in self.rewards.items()}
        out: list[float | None] = []
        for i in range(len(responses)):
            got = {n: p[i] for n, p in parts.items() if p[i] is not None}
            if not got or (self.require_all and len(got) < len(parts)):
                out.append(None)
                continue
            total_weight = sum(abs(self.weights[n]) for n in got)
            full_weight = sum(abs(w) for w in self.weights.values())
            out.append(sum(self.weights[n] * s for n, s in got.items()) * full_weight / total_weight)
        return out
