# Everything a newcomer needs: `make run` (set up + generate), `make test` (set up + test), `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/grok-1-tiny.yaml
PROMPT ?= The answer to life the universe and everything is of course

.PHONY: setup run test test-fast bench checkpoint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The main job until the HTTP/gRPC service lands: greedy generation in one process, on a random-weight
# checkpoint of the tiny config written on first use (a real checkpoint: CONFIG=... or --checkpoint DIR).
run: setup
	$(BIN)/grok1 generate "$(PROMPT)" --config $(CONFIG) --random-if-missing --max-tokens 24 --stream

checkpoint: setup
	$(BIN)/grok1 checkpoint random --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m benchmarks.bench_engine

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
