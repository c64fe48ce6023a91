# Every target creates .venv itself, so a fresh clone needs nothing but python3 and make.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test lint lock system-deps bench bench-quick bench-grpc bench-h2 bench-llm bench-instructions soak soak-fleet clean

# Installs are pinned by constraints.txt (every dependency, transitive ones included, at one version), so
# CI and every checkout run the same packages. After changing dependencies in pyproject.toml: `make lock`.
$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# Re-resolve every dependency (newest versions pyproject.toml allows) in a scratch venv and pin them.
lock:
	rm -rf .lock-venv
	$(PY) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip
	.lock-venv/bin/pip install -q -e '.[test,bench]'
	.lock-venv/bin/pip freeze --exclude-editable | sort -f > constraints.txt
	rm -rf .lock-venv

demo: $(STAMP)
	$(BIN)/sidecar demo

system-deps:
	bash scripts/system-deps.sh

# ruff and mypy (rules and scope in pyproject.toml); `make test` runs it first, so CI fails on either.
lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/mypy

test: $(STAMP) system-deps lint
	$(BIN)/python -m pytest -q

# Benchmarks: nginx, HAProxy and wrk come from Debian (bench/install.sh); the system under test is pinned
# to CPU 1, the load generator and upstream to CPU 0. Results: bench/results/*.md and *.png.
bench: $(STAMP)
	sh bench/install.sh
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m bench --full
	$(BIN)/python -m bench.llm_stream
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m bench.h2_throughput

bench-quick: $(STAMP)
	sh bench/install.sh
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m bench --quick

# Streamed LLM completions (SSE) direct vs through the full-policy route: first-chunk latency and
# throughput, bench/results/llm.md (also run by `make bench`)
bench-llm: $(STAMP)
	$(BIN)/python -m bench.llm_stream

# Unary gRPC calls direct vs through the sidecar (grpcio client and server): bench/results/grpc.md
bench-grpc: $(STAMP)
	$(BIN)/python -m bench.grpc_unary

# HTTP/2 throughput with h2load: direct, nginx (grpc_pass) and the sidecar (h2c): bench/results/h2.md
# (also run by `make bench`)
bench-h2: $(STAMP)
	sh bench/install.sh
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m bench.h2_throughput

# Instructions per request under callgrind (deterministic to ~0.2 %, unlike req/s on a shared VM): the
# bare aiohttp proxy and the sidecar with one and three endpoints. Needs valgrind (Debian's).
bench-instructions: $(STAMP)
	sh bench/install.sh
	command -v valgrind >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq --no-install-recommends valgrind >/dev/null; }
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m bench.instructions

soak: $(STAMP)
	$(BIN)/python -m bench.soak

# Two sidecars sharing one redis-server, killed like deleted pods (SIGKILL + state_dir wiped): 0 accepted
# writes may be lost. SOAK_MINUTES=2 for a short run.
SOAK_MINUTES ?= 10
soak-fleet: $(STAMP)
	$(BIN)/python -m bench.soak --fleet --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
