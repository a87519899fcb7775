# The two commands of the README: `make test` and `make report`. Both create .venv when it is
# missing and install everything into it. torch is pinned (override: make test TORCH=torch==2.11.0)
# so a CPU machine never pulls several GB of CUDA wheels.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.perceiver-fast-installed

.PHONY: install test report check clean

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" triton numpy pytest pytest-benchmark ninja setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# GPU-marked tests first (they skip without CUDA); then everything else, the Triton kernels
# running on the CPU under the interpreter; then the ahead-of-time compile of every kernel
# configuration for an H100 (sm_90).
test: install
	$(VENV)/bin/pytest tests -q -m gpu
	TRITON_INTERPRET=1 $(VENV)/bin/pytest tests -q -m "not gpu"
	$(PY) -m perceiver_fast.kernels.compile_check --arch 90

check: install
	$(PY) -m perceiver_fast.kernels.compile_check --arch 90

report: install
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
