# Every target creates .venv itself, so a fresh clone needs nothing but python3 and make.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test system-deps bench bench-quick bench-grpc soak soak-fleet clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sidecar demo

system-deps:
	bash scripts/system-deps.sh

test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

# Benchmarks: nginx, HAProxy and wrk come from Debian (bench/install.sh); the system under test is pinned
# to CPU 1, the load generator and upstream to CPU 0. Results: bench/results/*.md and *.png.
bench: $(STAMP)
	sh bench/install.sh
	$(BIN)/pip install -q -e '.[bench]'
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m bench --full

bench-quick: $(STAMP)
	sh bench/install.sh
	$(BIN)/pip install -q -e '.[bench]'
	PATH="$$PATH:/usr/sbin" $(BIN)/python -m bench --quick

# Unary gRPC calls direct vs through the sidecar (grpcio client and server): bench/results/grpc.md
bench-grpc: $(STAMP)
	$(BIN)/python -m bench.grpc_unary

soak: $(STAMP)
	$(BIN)/python -m bench.soak

# Two sidecars sharing one redis-server, killed like deleted pods (SIGKILL + state_dir wiped): 0 accepted
# writes may be lost. SOAK_MINUTES=2 for a short run.
SOAK_MINUTES ?= 10
soak-fleet: $(STAMP)
	$(BIN)/python -m bench.soak --fleet --minutes $(SOAK_MINUTES)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
