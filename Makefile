# The README's two commands: `make demo` (the main job) and `make test`. Both install what is missing first.
PYTHON ?= python3

.PHONY: install test lint bench demo

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[test]"

test: install
	$(PYTHON) -m ruff check blip2_hf blip2_hf_launch.py tests benchmarks training evaluation
	$(PYTHON) -m pytest -q -p no:cacheprovider

# `make demo` is the README's main command: a miniature BLIP-2 end to end on CPU (see `blip2-hf demo --help`).
demo: install
	$(PYTHON) -m blip2_hf.cli demo $(DEMO_ARGS)

bench: install
	$(PYTHON) benchmarks/bench_generation.py
