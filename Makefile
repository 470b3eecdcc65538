# Two entry points for a fresh machine:
#   make quickstart   set up .venv and run keizoku on the bundled sample
#   make test         set up .venv and run the test suite
# The dev/CI install pins the CPU build of torch (constraints/cpu.txt); the package itself asks for torch>=2.4.

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keizoku-installed
OUT ?= quickstart-out
ASSETS := src/keizoku/assets

.PHONY: install quickstart test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints/cpu.txt -e '.[dev]'
	touch $@

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/keizoku tokenize $(ASSETS)/data/ja_sample.jsonl.gz $(ASSETS)/data/en_sample.jsonl.gz \
		--tokenizer $(ASSETS)/tokenizer --output-dir $(OUT)/tokenized
	HF_HUB_OFFLINE=1 $(BIN)/keizoku inspect $(OUT)/tokenized/ja_sample_text_document --decode 1

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf $(OUT) .pytest_cache build dist src/*.egg-info
