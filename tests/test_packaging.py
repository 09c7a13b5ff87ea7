"""posttrain installs as a wheel with its recipes and prompts, and its top-level names are its own.

`reward`, `evals` and `recipes` are also the names of unrelated PyPI projects: these imports must resolve here.
"""

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["posttrain", "data_gen", "reward", "evals", "recipes"])
def test_top_level_packages_resolve_to_this_repo(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().is_relative_to(REPO), module.__file__


def test_wheel_carries_packages_recipes_and_prompts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("posttrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "recipes/cli.py",
        "posttrain/train/sft.py",
        "data_gen/generate.py",
        "reward/__init__.py",
        "evals/__init__.py",
        "recipes/config.yaml",
        "recipes/experiment/tiny.yaml",
        "data_gen/prompts/tiny.jsonl",
    ]:
        assert required in names, required
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "posttrain = recipes.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    # Installed from the wheel alone (no source tree on the path), the recipe still composes.
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import recipes, recipes.cli as c; assert recipes.__file__.startswith(sys.argv[1]), recipes.__file__;"
        "from hydra import initialize_config_module, compose;"
        "initialize_config_module(config_module='recipes', version_base='1.3');"
        "print(compose('config', overrides=['experiment=tiny']).generate.k)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"
