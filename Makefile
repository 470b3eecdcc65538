# Two entry points for a fresh machine:
#   make quickstart   set up .venv and run keizoku quickstart (the whole pipeline on bundled data, CPU)
#   make test         set up .venv and run the test suite
# The dev/CI install pins the CPU build of torch (constraints/cpu.txt); the package itself asks for torch>=2.4.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keizoku-installed
OUT ?= quickstart-out
# test files run in this many processes (pytest-xdist; a file's tests stay together, in order): most tests wait on
# subprocesses, schedulers and disk, so two share CI's 2 cores well. PYTEST_WORKERS=0: one process
PYTEST_WORKERS ?= 2

.PHONY: install quickstart test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt constraints/megatron-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e '.[dev]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r constraints/megatron-cpu.txt
	touch $@

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/keizoku quickstart --out $(OUT)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15

clean:
	rm -rf $(OUT) .pytest_cache build dist src/*.egg-info
