"""The Reward protocol: batch in, batch out.

A reward is any callable `(prompts, responses) -> list[float | None]`:
- `prompts[i]` is the prompt row the i-th response answers: a dict with `prompt_id`, `messages` (the chat turns
  before the answer) and whatever extra fields the prompt source carried for it (a reference `answer`,
  instruction `constraints`, unit `tests`, ...);
- `responses[i]` is the response text;
- the result has one entry per response: a float, or None when the reward cannot score that response (no
  reference answer, an unparseable judge verdict). None is kept and counted by the score stage, never dropped.

Rewards are named in recipes under a name of their own, by `_target_`, and built with their other keys as keyword
arguments (tests/test_hygiene.py checks that this example composes):

    reward:
      rewards:
        math:
          _target_: reward.verifiers.MathAnswer
        polite:
          _target_: mypkg.rewards.Politeness   # with allowed_targets: [mypkg.]
          threshold: 0.5                       # any keyword argument of the class
      primary: math                            # selection ranks by this one (or a reward.ensemble.WeightedEnsemble)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Reward(Protocol):
    def __call__(self, prompts: list[dict], responses: list[str]) -> list[float | None]: ...


def with_trained_model(name: str, node: dict, inputs: dict) -> dict:
    """A reward's config with `model` set to the reward model this run trained, for the reward named `rm` when the
    stage got that model as its input `rm` (score and eval stages): the stage config then does not depend on
    where the run directory lives. Other rewards' configs are returned as they are."""
    return {**node, "model": inputs["rm"]} if name == "rm" and inputs.get("rm") else node


def with_backend_models(node: Any) -> Any:
    """`node` with every nested `backend` config that names no `model` given its parent's `model` (a judge's
    backend serves the judge's model), as the generate stage gives its backend the generating model."""
    if isinstance(node, list):
        return [with_backend_models(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: with_backend_models(v) for k, v in node.items()}
    backend = node.get("backend")
    if isinstance(backend, dict) and "_target_" in backend and "model" not in backend and node.get("model"):
        node["backend"] = {**backend, "model": node["model"]}
    return node


def build_reward(node: dict) -> Reward:
    """A reward from its recipe config: a class `_target_` is built with the other keys as arguments; a
    function `_target_` is the reward itself (other keys are bound as keyword arguments)."""
    import functools
    import inspect

    from hydra.utils import get_object, instantiate

    target = get_object(node["_target_"])
    node = with_backend_models(node)
    if inspect.isclass(target):
        return instantiate(node, _convert_="all")
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    return functools.partial(target, **kwargs) if kwargs else target
