# One entry point for people and CI. `make test` installs what is missing, then runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.install-stamp
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install lock format lint typecheck test test-fast test-faults bench docs demo clean

install: $(STAMP)

# torch goes first, pinned, so that nothing later pulls a multi-GB CUDA build onto a CPU machine.
# Every version comes from constraints.txt, the lock the worker image uses too.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==$(TORCH_VERSION)
	$(PIP) install --quiet -c constraints.txt -e '.[worker,serve,dev]'
	touch $(STAMP)

# Re-pin constraints.txt to what pyproject.toml resolves to now, in a fresh environment of its own.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/pip install --quiet torch==$(TORCH_VERSION)
	.lock-venv/bin/pip install --quiet '.[worker,serve,dev]'
	{ sed -n '1,2p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | grep -v '^render-farm' \
	  | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt && rm -rf .lock-venv

format: install
	$(VENV)/bin/ruff format producer worker localfarm service tests bench tools
	$(VENV)/bin/ruff check --fix producer worker localfarm service tests bench tools

lint: install
	$(VENV)/bin/ruff check producer worker localfarm service tests bench tools
	$(VENV)/bin/ruff format --check producer worker localfarm service tests bench tools
	$(VENV)/bin/lint-imports
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml docker-compose.sentinel.yml
	$(VENV)/bin/kubernetes-validate --quiet infra/k8s/worker.yaml infra/k8s/api.yaml
	$(VENV)/bin/hadolint infra/worker.Dockerfile infra/service.Dockerfile

typecheck: install
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tools
	$(VENV)/bin/mypy tests

# Two test processes, whole files each (a module's farm of workers starts once): most of the suite waits on the
# worker processes it starts, so one pytest left a core idle (676 s serial; 400 s with two, one torch thread each:
# tests/conftest.py).
TEST_PROCESSES ?= 2

test: install
	$(VENV)/bin/pytest -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder --durations=15

test-fast: install
	$(VENV)/bin/pytest -m "not slow and not integration and not faults"

test-faults: install
	$(VENV)/bin/pytest -m faults

bench: install
	$(PY) bench/record.py

# docs/configuration.md is generated from the settings classes; tests/unit/test_docs.py fails when it drifts.
# docs/openapi.json is the HTTP service's API document; tests/integration/test_http_api.py fails when it drifts.
docs: install
	$(PY) tools/settings_doc.py
	$(PY) tools/openapi_doc.py

demo: install
	$(VENV)/bin/render demo --out render-output/demo

clean:
	rm -rf $(VENV) render-output .pytest_cache .mypy_cache .ruff_cache
