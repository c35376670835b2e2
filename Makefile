# pyvirtio: `make demo` runs the main job, `make test` runs the whole suite.
# Both set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit fuzz bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || (apt-get update -qq && apt-get install -y -qq python3 python3-venv)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pyvirtio demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks fuzz
	$(VENV)/bin/ruff format --check src tests benchmarks fuzz

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src

unit: $(STAMP)
	$(VENV)/bin/pytest -q

fuzz: $(STAMP)
	$(PY) fuzz/fuzz_chains.py --runs 3000

test: lint typecheck unit fuzz

bench: $(STAMP)
	$(PY) benchmarks/virtqueue.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
