# The two commands of the README's quick start: `make demo` and `make test`.
# Both start from a machine with only Python 3.11 and a C++ compiler; they create .venv,
# install what they need (torch 2.13.0, fbgemm, grpc, ...; grpc++ from Debian when root) and
# build the C++ core.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# fbgemm's CUDA build where a GPU driver is present, its CPU build elsewhere.
FBGEMM_EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
PYTEST_ARGS ?=

.PHONY: install test test-deep check demo lint clean system-tools native-deps asan torchrec

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Third-party dependencies: reinstalled only when pyproject.toml changes.
$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --progress-bar on torch==2.13.0 "scikit-build-core>=0.10" "nanobind>=2.4" "cmake>=3.18,<4" ninja
	$(BIN)/pip install --progress-bar on --no-build-isolation ".[$(FBGEMM_EXTRA),test]"
	touch $@

# TorchRec, the peer of `embps bench train --peer torchrec`, in a folder of its own that the bench
# puts on PYTHONPATH for the peer's processes only: torchrec's wheel requires fbgemm-gpu (the CUDA
# build), which would replace the fbgemm-gpu-cpu we install, so it and its pure-Python
# dependencies go in with --no-deps, pinned to what was tested beside torch 2.13.0 / fbgemm 1.8.0.
TORCHREC_DIR := $(VENV)/torchrec
TORCHREC_PINS := torchrec==1.8.0 tensordict==0.15.3 pyvers==0.2.3 torchmetrics==1.0.3 \
  lightning-utilities==0.15.3 pyre-extensions==0.0.32 typing-inspect==0.9.0 mypy-extensions==1.2.0 \
  cloudpickle==3.1.3 orjson==3.13.0
torchrec: install
	$(BIN)/pip install --progress-bar on --no-deps --target $(TORCHREC_DIR) $(TORCHREC_PINS)

# grpc++ for the serving gate (serving/gate.py), from Debian where we are root; without it the
# package builds without the gate and replicas shed in Python and gRPC's core (CANCELLED).
native-deps:
	@if pkg-config --exists grpc++ 2>/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing libgrpc++-dev (Debian) for the serving gate"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    libgrpc++-dev pkg-config >/dev/null) || echo "could not install libgrpc++-dev: building without the serving gate"; \
	else echo "no grpc++ and not root with apt-get: building without the serving gate"; fi

# The package itself (C++ core included) is rebuilt on every install; CMake keeps build/ warm.
install: native-deps $(VENV)/.deps
	$(BIN)/pip install --no-build-isolation --no-deps --force-reinstall --quiet .

# Debian tools some tests use (promtool, redis-server, etcd); tests skip with a message without them.
system-tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  missing=""; \
	  command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	  command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	  command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	  command -v etcdctl >/dev/null 2>&1 || missing="$$missing etcd-client"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing (Debian)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	      || echo "could not install$$missing: the tests that need them will skip"; \
	  fi; \
	else echo "not root or no apt-get: tests that need promtool/redis-server/etcd skip where they are absent"; fi

# The suite starts a few hundred Python processes from this checkout: let them cache its
# bytecode (Python's default) even where the environment turns that off.
PYTEST := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -p no:cacheprovider

# make test and make check run the tests on TEST_WORKERS processes (pytest-xdist), each taking
# one test file at a time, so a file's module fixtures start once; most tests wait on processes
# they started, and two workers keep both cores of this project's machines busy. Ports come from
# blocks each process claims (bench/ports.py), so workers never start servers on the same port.
# TEST_WORKERS=0: one process, in order.
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadfile

# Every test, real processes included (the fuzz suite at 1,000 requests per method).
test: install system-tools
	$(PYTEST) $(PARALLEL) $(PYTEST_ARGS)

# The same with the fuzz suite at 10,000 requests per method (hypothesis profile `deep`).
test-deep: install system-tools
	$(PYTEST) $(PARALLEL) --hypothesis-profile=deep $(PYTEST_ARGS)

# The fast tier for the edit-test loop: lint, then every test that starts no process (a test is
# skipped where it would start one; see tests/conftest.py).
check: install lint
	$(PYTEST) -q --no-processes $(PARALLEL) $(PYTEST_ARGS)

demo: install
	$(BIN)/embps launch examples/demo.toml

lint: $(VENV)/.deps
	$(BIN)/ruff check ps worker serving bench deploy tests embps.py

# The serving replica's native request parser (csrc/serving_lookup.cpp) under AddressSanitizer and
# UBSan: the gate module is built with -fsanitize=address,undefined into $(ASAN_DIR) (the package
# installed in .venv is left as it is), a copy of the tracked tree gets that module, and the
# serving fuzz tests (tests/fuzz, a real replica) run there with libasan preloaded into every
# process, then the native row store's own tests (in process; -s, so that a report is not lost in
# pytest's capture when it aborts). Any report aborts the process, which fails the tests.
# ASAN_FUZZ_PROFILE=deep: 10,000 requests per method instead of 1,000. A small quarantine keeps
# the processes' RSS within the fuzz tests' growth bound (ASan's default 256 MB quarantine alone
# exceeds it).
ASAN_DIR := build-asan
ASAN_FUZZ_PROFILE ?= default
SANITIZE_FLAGS := -fsanitize=address,undefined;-fno-sanitize-recover=undefined;-fno-omit-frame-pointer
asan: install system-tools
	rm -rf $(ASAN_DIR)/site $(ASAN_DIR)/tree
	$(BIN)/pip install --no-build-isolation --no-deps --quiet --target $(ASAN_DIR)/site \
	  -C build-dir=$(ASAN_DIR)/cmake -C "cmake.define.EMBPS_GATE_SANITIZE=$(SANITIZE_FLAGS)" .
	mkdir -p $(ASAN_DIR)/tree
	git ls-files -z | xargs -0 cp --parents -t $(ASAN_DIR)/tree
	cp $(ASAN_DIR)/site/_embps_gate*.so $(ASAN_DIR)/tree/
	cd $(ASAN_DIR)/tree && LD_PRELOAD="$$(g++ -print-file-name=libasan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:quarantine_size_mb=16 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  env -u PYTHONDONTWRITEBYTECODE $(CURDIR)/$(BIN)/python -m pytest -p no:cacheprovider \
	  --hypothesis-profile=$(ASAN_FUZZ_PROFILE) -k "serving" tests/fuzz/test_fuzz_rpcs.py $(PYTEST_ARGS)
	cd $(ASAN_DIR)/tree && LD_PRELOAD="$$(g++ -print-file-name=libasan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:quarantine_size_mb=16 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  env -u PYTHONDONTWRITEBYTECODE $(CURDIR)/$(BIN)/python -m pytest -p no:cacheprovider -s \
	  tests/serving/test_store.py tests/serving/test_cut_store.py tests/serving/test_native_lookups.py $(PYTEST_ARGS)

clean:
	rm -rf build $(ASAN_DIR) $(VENV)
