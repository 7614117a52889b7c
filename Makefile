# `make test` is the README's test command: it installs what is missing, then runs the whole suite.
PYTHON ?= python3

.PHONY: install test lint bench

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m ruff check blip2_hf tests benchmarks training evaluation
	$(PYTHON) -m pytest -q -p no:cacheprovider

bench: install
	$(PYTHON) benchmarks/bench_generation.py
