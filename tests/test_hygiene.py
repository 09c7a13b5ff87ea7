"""Code hygiene CI enforces: ruff (the config in pyproject.toml, also run by .pre-commit-config.yaml), no code after
`if __name__ == "__main__"`, no schema key that nothing reads, and docstrings whose recipe examples compose."""

import ast
import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from posttrain import config as schema

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["posttrain", "data_gen", "reward", "evals", "recipes"]


def sources(exclude=()):
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if p.relative_to(ROOT).as_posix()
            not in exclude]


def test_ruff_is_clean():
    """ruff comes with the dev extra that `make test` installs; the rules are pyproject.toml's."""
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _main_guard_not_last(tree: ast.Module) -> bool:
    for i, node in enumerate(tree.body):
        if (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"):
            return i != len(tree.body) - 1
    return False


def test_nothing_after_the_main_guard():
    late = [str(p.relative_to(ROOT)) for p in sources() if _main_guard_not_last(ast.parse(p.read_text()))]
    assert not late, f"code after `if __name__ == '__main__'` in {late}"
    assert _main_guard_not_last(ast.parse("if __name__ == '__main__':\n    main()\n\ndef late():\n    pass\n"))


def _schema_fields(cls, prefix="") -> list[str]:
    """Dotted names of every field of a schema dataclass and of the dataclasses it nests."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        kind = hints[f.name]
        nested = [a for a in typing.get_args(kind) if dataclasses.is_dataclass(a)] or (
            [kind] if dataclasses.is_dataclass(kind) else [])
        for sub in nested:
            out += _schema_fields(sub, f"{prefix}{f.name}.")
    return out


def _names_read(paths) -> set[str]:
    """Attribute names, string constants (subscripts, .get keys, settings keys) and keyword names in the code."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
    return names


def test_every_schema_key_is_read_somewhere():
    read = _names_read(sources(exclude=("posttrain/config.py",)))
    unread = [key for key in _schema_fields(schema.PosttrainConfig) if key.split(".")[-1] not in read]
    assert not unread, f"schema keys nothing reads: {unread}"


def test_reward_protocol_docstring_example_composes():
    """The recipe snippet in reward/protocol.py's docstring is valid against the schema."""
    import reward.protocol

    doc = reward.protocol.__doc__
    snippet = doc[doc.index("    reward:"):].split("\n\n")[0]
    example = yaml.safe_load(snippet.replace("\n    ", "\n").removeprefix("    "))
    merged = OmegaConf.merge(OmegaConf.structured(schema.PosttrainConfig), example)
    assert set(merged.reward.rewards) == set(example["reward"]["rewards"])
    assert all("_target_" in node for node in merged.reward.rewards.values())
