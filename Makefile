# pyvirtio: `make demo` runs the main job, `make test` runs the whole suite.
# Both set up everything they need on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the real-peer and real-guest tests use: QEMU (microvm, qtest),
# qemu-storage-daemon, busybox for guest initramfs images, iproute2 for netns,
# DPDK's dpdk-testpmd (virtio-user and vhost PMD) for the net interop tests.
DEB_PACKAGES := qemu-system-x86 qemu-system-common qemu-utils busybox-static iproute2 kmod dpdk dpdk-dev
DEB_BINARIES := qemu-system-x86_64 qemu-storage-daemon busybox ip dpdk-testpmd

.PHONY: demo test lint typecheck unit fuzz bench clean debs

# Install the Debian packages only when a binary is missing (needs root, as on CI).
debs:
	@missing=""; for b in $(DEB_BINARIES); do command -v $$b >/dev/null || missing="$$missing $$b"; done; \
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
	$(VENV)/bin/ruff check src tests benchmarks fuzz
	$(VENV)/bin/ruff format --check src tests benchmarks fuzz

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src

unit: $(STAMP) debs
	$(VENV)/bin/pytest -q

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

test: lint typecheck fuzz unit

bench: $(STAMP)
	$(PY) benchmarks/virtqueue.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis $(FUZZ_LOGS)
