# Two entry points (README): `make demo` runs the whole pipeline on the embedded demo profile,
# `make test` runs the test suite. Both create the virtual environment first if needed.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Stage commands (`python -m stages.<name>`) must find the project's environment.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo test browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Headless Chromium for the report's browser test (Debian package; the test skips without it).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium could not be installed: the browser test will be skipped"

demo: setup
	$(BIN)/dvc repro

# One torch thread per test process: two processes on two cores, no oversubscription.
test: setup browser
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)
