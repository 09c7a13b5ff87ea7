"""The top-level packages import one way: a package imports only from itself and from the packages below it.

    recipes   the driver: the round loop, validation, the `posttrain` command, the Hydra recipes
    evals     eval stage, suites, the run report
    reward    rewards, score / filter / select stages
    data_gen  prompt sources, generation backends, generate stage
    posttrain the library: errors, run directory, config schemas, models, chat format, training stages

Every import statement is read from the source (top-level and inside functions, `import x` and `from x import y`),
so a lazy import inside a function counts as much as one at the top of a module.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["posttrain", "data_gen", "reward", "evals", "recipes"]  # bottom to top


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of every absolute import in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def upward_imports(root: Path = ROOT) -> list[str]:
    problems = []
    for level, package in enumerate(LAYERS):
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_packages(path):
                if name in LAYERS and LAYERS.index(name) > level:
                    problems.append(f"{path.relative_to(root)}:{line} ({package}) imports {name}, a higher layer")
    return problems


def test_imports_point_down_only():
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_the_checker_finds_an_upward_import(tmp_path):
    """The check is not vacuous: a lazy import of the driver from the library is caught, with file and line."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "posttrain" / "ok.py").write_text("import json\nfrom posttrain.errors import PosttrainError\n")
    (tmp_path / "reward" / "ok.py").write_text("from data_gen.backend import Sampling\n")
    (tmp_path / "posttrain" / "bad.py").write_text("def f():\n    from recipes.loop import run\n    return run\n")
    (tmp_path / "data_gen" / "bad.py").write_text("import evals.stage\n")
    assert upward_imports(tmp_path) == [
        "posttrain/bad.py:2 (posttrain) imports recipes, a higher layer",
        "data_gen/bad.py:1 (data_gen) imports evals, a higher layer",
    ]


@pytest.mark.parametrize("package", LAYERS)
def test_every_package_is_a_layer(package):
    assert (ROOT / package / "__init__.py").is_file()
