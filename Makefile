# Everything a newcomer needs: `make run` (set up + generate), `make test` (set up + test), `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/grok-1-tiny.yaml
PROMPT ?= The answer to life the universe and everything is of course

.PHONY: setup run test test-fast lint bench checkpoint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Jobs that run the engine in this process run it under tcmalloc where installed, as the workers do
# (workers/allocator.py: XLA:CPU's per-step buffers; GROK1_ALLOCATOR=system to opt out).
WITH_ALLOCATOR := $(BIN)/python -m workers.allocator

# The main job until the HTTP/gRPC service lands: greedy generation in one process, on a random-weight
# checkpoint of the tiny config written on first use (a real checkpoint: CONFIG=... or --checkpoint DIR).
run: setup
	$(WITH_ALLOCATOR) $(BIN)/grok1 generate "$(PROMPT)" --config $(CONFIG) --random-if-missing --max-tokens 24 --stream

checkpoint: setup
	$(BIN)/grok1 checkpoint random --config $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q --durations=25  # the slowest 25: where CI's time goes

lint: setup
	$(BIN)/ruff check .

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The decode step with glibc's malloc vs tcmalloc; the single-process engine; the expert-parallel engine as
# 1, 2, 4 processes over gloo; the Ray cluster (router + 2-worker group on two nodes); the served endpoint
# (closed loop, then latency vs rate, open loop, with our generator over gRPC and AIPerf over HTTP), and again
# with clients straight to the replica (direct ingress); start-up and rebuild with the compilation cache off,
# cold, warm.
# Each prints a table of ratios measured side by side (docs/benchmarks.md).
AIPERF_VENV ?= .venv-aiperf
bench: setup $(AIPERF_VENV)/.installed
	$(BIN)/python -m benchmarks.bench_allocator
	$(WITH_ALLOCATOR) $(BIN)/python -m benchmarks.bench_engine
	$(WITH_ALLOCATOR) $(BIN)/python -m benchmarks.bench_paged
	$(WITH_ALLOCATOR) $(BIN)/python -m benchmarks.bench_multiprocess
	$(WITH_ALLOCATOR) $(BIN)/python -m benchmarks.bench_cluster
	$(BIN)/python -m benchmarks.bench_serve
	$(BIN)/python -m benchmarks.bench_serve --direct-ingress --rates
	$(BIN)/python -m benchmarks.bench_startup

# AIPerf pins its own prometheus-client (and brings transformers for its tokenizer): its own virtualenv.
$(AIPERF_VENV)/.installed:
	$(PYTHON) -m venv $(AIPERF_VENV)
	$(AIPERF_VENV)/bin/pip install -q aiperf==0.13.0
	touch $@

clean:
	rm -rf $(VENV) $(AIPERF_VENV) checkpoints .pytest_cache tests/deploy/prometheus_operator/node_modules

# The deployment files (ray_up/, k8s/, docker/) checked against Ray's, KubeRay's and Serve's own
# schemas, the CLI and the planner, without a cluster (docs/deploy.md, section 9).
.PHONY: deploy-check
deploy-check: setup
	$(BIN)/python -m pytest -q tests/test_deploy.py

# The service: OpenAI-compatible HTTP on :8000 and gRPC on :9000 in front of a 2-shard expert-parallel group, on
# a random-weight checkpoint written on first use. A real checkpoint: CONFIG=configs/grok-1.yaml CHECKPOINT=DIR;
# an existing Ray cluster: RAY_ADDRESS=host:6379 make serve. Ctrl-C stops it.
.PHONY: serve protos
EP ?= 2
serve: setup
	$(BIN)/grok1 serve --config $(CONFIG) --ep $(EP) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT),--random-if-missing)

# Regenerate the committed gRPC stubs (grok1_api/v1/) from proto/; tests/test_ingress.py checks they are current.
protos: setup
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. \
		proto/grok1_api/v1/grok1.proto
