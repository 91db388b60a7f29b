SHELL := /bin/bash
# Two commands: `make run` trains the main config, `make test` runs the test suite.
# Both create .venv and install pinned dependencies on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
CONFIG ?= configs/diffusion_hmadamw.yaml

.PHONY: install run test test-slow test-dist test-all bench clean

$(STAMP): pyproject.toml constraints.txt requirements-nodeps.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	# litdata hard-requires torchvision, which breaks `import lightning` on a CPU torch: install it alone.
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt 2> >(grep -v "is ignored: it is neither" >&2)
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/lowmem fit --config $(CONFIG)

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

test-dist: install
	$(BIN)/python -m pytest -m distributed

test-all: install
	$(BIN)/python -m pytest -m ''

bench: install
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) lightning_logs runs
