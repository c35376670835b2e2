# pyvirtio: `make demo` runs the main job, `make test` runs the whole suite.
# Both set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the real-peer and real-guest tests use: QEMU (microvm, qtest),
# qemu-storage-daemon, busybox for guest initramfs images, iproute2 for netns,
# DPDK's dpdk-testpmd (virtio-user and vhost PMD) for the net interop tests;
# gcc and python3-dev (Python.h) for the mypyc build of the hot modules.
DEB_PACKAGES := qemu-system-x86 qemu-system-common qemu-utils busybox-static iproute2 kmod dpdk dpdk-dev \
	gcc python3-dev
DEB_BINARIES := qemu-system-x86_64 qemu-storage-daemon busybox ip dpdk-testpmd gcc
PYTHON_H = $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h

# The mypyc build: the hot modules (pyvirtio.compiled.HOT_MODULES) compiled
# from the same source, installed (not editable) into a venv of its own, so
# compiled files never shadow the sources of the editable .venv.  It is the
# default install (setup.py compiles unless the toolchain is missing), made
# the way a user's `pip install .` makes it; the editable .venv is the
# pure-Python fallback.  Rebuilt whenever a source changes.
VENV_COMPILED := .venv-compiled
PY_COMPILED := $(VENV_COMPILED)/bin/python
COMPILED_STAMP := $(VENV_COMPILED)/.installed
SOURCES := $(shell find src -name '*.py')
# What the compiled build is tested with: every unit and host test (about
# two minutes) and a real Linux guest on `pyvirtio serve blk` run compiled;
# the other real-guest tests run on the pure-Python build only.
COMPILED_TESTS := $(wildcard tests/test_*.py) \
	tests/e2e/test_vhost_user_guest.py::test_linux_guest_uses_pyvirtio_block_and_entropy

.PHONY: demo test lint typecheck unit unit-compiled compiled fuzz bench clean debs

# Install the Debian packages only when a binary (or Python.h) is missing
# (needs root, as on CI).
debs:
	@missing=""; for b in $(DEB_BINARIES); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
	[ -f "$(PYTHON_H)" ] || missing="$$missing Python.h"; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages (missing:$$missing)"; \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(DEB_PACKAGES) >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || (apt-get update -qq && apt-get install -y -qq python3 python3-venv)
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
		(apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV))
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP) debs
	$(VENV)/bin/pyvirtio demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks fuzz setup.py
	$(VENV)/bin/ruff format --check src tests benchmarks fuzz setup.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src

unit: $(STAMP) debs
	PYVIRTIO_EXPECT_COMPILED=0 $(VENV)/bin/pytest -q

$(COMPILED_STAMP): pyproject.toml setup.py $(SOURCES) | debs
	test -x $(PY_COMPILED) || $(PYTHON) -m venv $(VENV_COMPILED)
	$(PY_COMPILED) -m pip install -q --upgrade pip
	$(PY_COMPILED) -m pip install -q 'setuptools>=77' wheel 'mypy>=1.10'
	rm -rf build  # setuptools would reuse extensions left from an earlier build
	$(PY_COMPILED) -m pip install -q --no-build-isolation '.[dev]'
	rm -rf build
	touch $(COMPILED_STAMP)

compiled: $(COMPILED_STAMP)
	$(VENV_COMPILED)/bin/pyvirtio --version

unit-compiled: $(COMPILED_STAMP) debs
	PYVIRTIO_EXPECT_COMPILED=1 $(VENV_COMPILED)/bin/pytest -q -p no:cacheprovider $(COMPILED_TESTS)

# A short run of every fuzz/fuzz_*.py (each stops at FUZZ_RUNS inputs or
# FUZZ_SECONDS, whichever comes first); logs and crash inputs go to FUZZ_LOGS.
FUZZ_RUNS ?= 20000
FUZZ_SECONDS ?= 3
FUZZ_LOGS := .fuzz-logs
fuzz: $(STAMP)
	@mkdir -p $(FUZZ_LOGS); failed=""; \
	for target in fuzz/fuzz_*.py; do \
		name=$$(basename $$target .py); log=$(FUZZ_LOGS)/$$name.log; \
		if $(PY) $$target --runs $(FUZZ_RUNS) -max_total_time=$(FUZZ_SECONDS) -timeout=20 \
				-artifact_prefix=$(FUZZ_LOGS)/$$name- > $$log 2>&1; then \
			echo "$$name: $$(grep -E '^Done|hypothesis inputs' $$log | tail -n 1)"; \
		else \
			echo "$$name: FAILED, log in $$log:"; tail -n 60 $$log; failed="$$failed $$name"; \
		fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz targets failed:$$failed"; exit 1; fi

test: lint typecheck fuzz unit unit-compiled

bench: $(STAMP)
	$(PY) benchmarks/virtqueue.py

clean:
	rm -rf $(VENV) $(VENV_COMPILED) build .pytest_cache .mypy_cache .ruff_cache .hypothesis $(FUZZ_LOGS)
