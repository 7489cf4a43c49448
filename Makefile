# One entry point for people and CI. `make test` installs what is missing, then runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.install-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install format lint typecheck test test-fast test-faults bench demo clean

install: $(STAMP)

# torch goes first, pinned, so that nothing later pulls a multi-GB CUDA build onto a CPU machine.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	$(PIP) install --quiet -e '.[worker,dev]'
	touch $(STAMP)

format: install
	$(VENV)/bin/ruff format producer worker tests bench
	$(VENV)/bin/ruff check --fix producer worker tests bench

lint: install
	$(VENV)/bin/ruff check producer worker tests bench
	$(VENV)/bin/ruff format --check producer worker tests bench

typecheck: install
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests

test: install
	$(VENV)/bin/pytest

test-fast: install
	$(VENV)/bin/pytest -m "not slow and not integration and not faults"

test-faults: install
	$(VENV)/bin/pytest -m faults

bench: install
	$(PY) bench/record.py

demo: install
	$(VENV)/bin/render demo --out render-output/demo

clean:
	rm -rf $(VENV) render-output .pytest_cache .mypy_cache .ruff_cache
