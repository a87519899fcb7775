# The two commands of the README: `make test` and `make report`. Both create .venv when it is
# missing and install everything into it. torch is pinned (override: make test TORCH=torch==2.11.0)
# so a CPU machine never pulls several GB of CUDA wheels.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
# The libraries pf.patch replaces (setup.py's "test" extra), for the drop-in tests and benchmark.
# krasserm's perceiver-io 0.11.0 declares Python < 3.11, but the modules we patch run on 3.11:
# it is installed without its dependencies, after the two it needs (einops, fairscale).
DROP_IN_LIBS := transformers==5.23.0 perceiver-pytorch==0.11.0 einops fairscale
# The CPU deployment routes: the ONNX runtimes the model benchmarks compare whole models against, and
# torch's dynamo ONNX exporter (onnxscript), with which tests/test_export.py exports patched models.
RUNTIMES := onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 openvino==2026.4.1
DEPS_STAMP := $(VENV)/.perceiver-fast-deps
BUILD_STAMP := $(VENV)/.perceiver-fast-built
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: install test test-properties test-oldest-triton test-oldest-torch test-packaging test-aarch64 test-aarch64-ci report check cuda-check gpu gpu-prebuild gpu-dry-run clean

# A current pip: older ones fall back to `setup.py develop`, which builds in an isolated
# environment without torch.
$(DEPS_STAMP): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" triton numpy pytest pytest-benchmark hypothesis ninja setuptools wheel matplotlib
	$(PY) -m pip install --quiet "$(TORCH)" $(DROP_IN_LIBS)
	$(PY) -m pip install --quiet $(RUNTIMES)
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python perceiver-io==0.11.0
	touch $(DEPS_STAMP)

# The editable install compiles csrc/ into perceiver_fast._C, again whenever a source changes;
# the venv's bin on PATH lets torch's BuildExtension find ninja (parallel compiles).
$(BUILD_STAMP): $(DEPS_STAMP) setup.py $(CSRC)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(BUILD_STAMP)

install: $(BUILD_STAMP)

# The GPU machine's prebuilt extension and a dry run of `make gpu` first (tests/test_gpu_run.py then checks
# the prebuilt manifest too); the GPU-marked tests (they skip without CUDA); then everything else (the C++ cpu
# backend natively, the Triton kernels on the CPU under the interpreter); then the ahead-of-time compile of
# every kernel configuration for an H100 (sm_90).
test: install cuda-check
	@if [ -n "$(GPU_MACHINE_PYTHON)" ]; then $(MAKE) --no-print-directory gpu-dry-run; else \
	  echo "make test: no Python 3.12 (the GPU machine's) here: the GPU prebuild and dry run did not run"; fi
	$(VENV)/bin/pytest tests -q -m gpu
	TRITON_INTERPRET=1 $(VENV)/bin/pytest tests -q -m "not gpu"
	$(PY) -m perceiver_fast.kernels.compile_check --arch 90

# The property suite (tests/test_properties.py) with more examples than `make test` runs (20 per
# property and backend): PROPERTY_EXAMPLES each.
PROPERTY_EXAMPLES ?= 300
test-properties: install
	PROPERTY_EXAMPLES=$(PROPERTY_EXAMPLES) TRITON_INTERPRET=1 $(VENV)/bin/pytest tests/test_properties.py -q

# The oldest triton setup.py admits is the GPU machine's (3.6): its Triton tests under the
# interpreter and the ahead-of-time compile check run in a second environment with it, against this
# tree and the extension `make install` built in it, so that an API that triton lacks fails here,
# not on the GPU. triton 3.6's interpreter calls int() on one-element arrays, which NumPy 2.3
# refuses: that environment keeps an older NumPy.
OLDEST_TRITON ?= triton==3.6.0
OLDEST_VENV ?= .venv-oldest-triton
OLDEST_STAMP := $(OLDEST_VENV)/.perceiver-fast-deps
$(OLDEST_STAMP): Makefile
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(TORCH)" "$(OLDEST_TRITON)" "numpy<2.3" pytest
	touch $(OLDEST_STAMP)

test-oldest-triton: install $(OLDEST_STAMP)
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=1 $(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider \
	  -W "ignore:Conversion of an array with ndim > 0:DeprecationWarning" \
	  tests/test_triton_attention.py tests/test_triton_dropout.py tests/test_tiles.py tests/test_input_attention.py \
	  tests/test_compile.py tests/test_dropout.py \
	  -m "not gpu" -k "triton or Triton or tiles or compile_check"
	PYTHONPATH=$(CURDIR) $(OLDEST_VENV)/bin/python -m perceiver_fast.kernels.compile_check --arch 90

# The GPU machine's environment: its Python (3.12) and torch (2.11.0+cu130, the oldest setup.py admits; a
# CUDA build, 4.6 GB installed, about a minute here), in .venv-gpu-machine. `make gpu-prebuild` installs this
# tree there with `pip install --no-build-isolation .`, its CUDA kernels built for the H100 (sm_90a), and
# keeps the extension in .gpu-prebuilt/ for `make gpu` on that machine, which then skips its build
# (tools/gpu_prebuild.py; a run carries the folder). It checks what it kept: built for that Python, torch
# and tree, loads beside that torch with its CUDA functions, small enough to travel, and an sm_90 cubin of
# every CUDA kernel. Python 3.12 is taken from pyenv's versions or python3.12 (GPU_MACHINE_PYTHON=... names one).
GPU_MACHINE_TORCH ?= torch==2.11.0
GPU_MACHINE_VENV ?= .venv-gpu-machine
GPU_MACHINE_PYTHON ?= $(shell for p in $(HOME)/.pyenv/versions/3.12.*/bin/python3 $$(command -v python3.12); do \
  "$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && echo "$$p" && break; done)
GPU_MACHINE_STAMP := $(GPU_MACHINE_VENV)/.perceiver-fast-deps
# torch guesses the CUDA toolkit from nvcc's folder; nvcc itself names it (here /usr/local/bin/nvcc is a
# script that runs the toolkit's).
NVCC_CUDA_HOME = $(abspath $(shell nvcc -v -E -x cu /dev/null 2>&1 | sed -n 's/^\#\$$ TOP=//p'))
$(GPU_MACHINE_STAMP): Makefile
	@test -n "$(GPU_MACHINE_PYTHON)" || { echo "no Python 3.12, the GPU machine's: install it (pyenv install 3.12) or \
	  set GPU_MACHINE_PYTHON"; exit 1; }
	test -x $(GPU_MACHINE_VENV)/bin/python || $(GPU_MACHINE_PYTHON) -m venv $(GPU_MACHINE_VENV)
	$(GPU_MACHINE_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_MACHINE_VENV)/bin/python -m pip install --quiet "$(GPU_MACHINE_TORCH)" numpy pytest hypothesis ninja setuptools wheel
	touch $(GPU_MACHINE_STAMP)

GPU_PREBUILT := .gpu-prebuilt/manifest.json
# The package's Python files too: test-oldest-torch tests the installed package.
PACKAGE_FILES := $(shell find perceiver_fast -name '*.py' -o -name '*.json' 2>/dev/null)
$(GPU_PREBUILT): $(GPU_MACHINE_STAMP) setup.py $(CSRC) $(PACKAGE_FILES)
	@command -v nvcc >/dev/null || { echo "make gpu-prebuild: nvcc not found: the CUDA kernels cannot be built"; exit 1; }
	CUDA_HOME=$(NVCC_CUDA_HOME) TORCH_CUDA_ARCH_LIST=9.0a PATH="$(abspath $(GPU_MACHINE_VENV))/bin:$$PATH" \
	  $(GPU_MACHINE_VENV)/bin/python -m pip install --quiet --no-build-isolation --no-deps --force-reinstall .
	$(GPU_MACHINE_VENV)/bin/python tools/gpu_prebuild.py

gpu-prebuild: $(GPU_PREBUILT)
	$(GPU_MACHINE_VENV)/bin/python tools/gpu_prebuild.py --check

# The prebuild and `make gpu`'s plan where the GPU machine's Python and torch run without a GPU: a dry run
# that must take the prebuilt extension; the smoke script checked without a GPU, its Triton kernels
# interpreted (make test runs this where Python 3.12 is found).
gpu-dry-run: install gpu-prebuild
	$(GPU_MACHINE_VENV)/bin/python tools/gpu_run.py --out build/gpu-dry-run --expect-prebuilt
	TRITON_INTERPRET=1 PYTHONPATH=$(CURDIR) $(PY) tools/gpu_smoke.py --device cpu --one

# The oldest torch setup.py admits is the GPU machine's: the cpu contract, dispatch and torch.compile tests
# on what `make gpu-prebuild` installed there (the CPU kernels of the extension built with CUDA), so that an
# API newer than the floor fails here.
test-oldest-torch: gpu-prebuild
	$(GPU_MACHINE_VENV)/bin/pytest -q -p no:cacheprovider $(CONTRACT_TESTS) tests/test_dispatch.py tests/test_compile.py \
	  tests/test_linear.py tests/test_non_finite.py tests/test_reference.py tests/test_nn.py

# The package as a user gets it, built the other ways the README documents: the sdist (from the
# tracked and new files of this tree), a wheel built from it with build isolation (the torch of the
# build environment pinned to this venv's, a local CPU build here: PIP_CONSTRAINT for `build`,
# --build-constraint for pip, which applies no other constraint to build environments) and with clang,
# without OpenMP (what Apple clang without libomp builds: csrc/cpu/parallel.h's threads, clang's
# target attributes), and a fresh venv that installs that wheel and runs the cpu contract tests on it.
# clang comes from Debian's packages where it is missing (as root, as CI runs).
PACKAGING ?= build/packaging
CONTRACT_TESTS := tests/test_cpu_attention.py tests/test_input_attention.py tests/test_dropout.py tests/test_devices.py
test-packaging: install
	command -v clang++ >/dev/null || { apt-get update -qq && apt-get install -y -qq clang; }
	rm -rf $(PACKAGING) && mkdir -p $(PACKAGING)/tree
	git ls-files -co --exclude-standard | grep -v '^$(PACKAGING)' | tar -cf - -T - | tar -xf - -C $(PACKAGING)/tree
	$(PY) -c "import torch; print('torch==' + torch.__version__)" > $(PACKAGING)/constraints.txt
	$(PY) -m pip install --quiet build
	cd $(PACKAGING)/tree && PIP_CONSTRAINT=$(abspath $(PACKAGING))/constraints.txt $(abspath $(PY)) -m build --sdist \
	  --outdir $(abspath $(PACKAGING))/dist .
	CC=clang CXX=clang++ PERCEIVER_FAST_OPENMP=0 $(PY) -m pip wheel --no-deps \
	  --build-constraint $(PACKAGING)/constraints.txt -w $(PACKAGING)/dist $(PACKAGING)/dist/perceiver_fast-*.tar.gz
	$(PYTHON) -m venv $(PACKAGING)/venv
	$(PACKAGING)/venv/bin/pip install --quiet -c $(PACKAGING)/constraints.txt $(PACKAGING)/dist/perceiver_fast-*.whl \
	  pytest hypothesis
	$(PACKAGING)/venv/bin/python tools/check_wheel.py $(PACKAGING)/dist/perceiver_fast-*.whl
	$(PACKAGING)/venv/bin/pytest -q -p no:cacheprovider $(CONTRACT_TESTS)

# Every CUDA source compiled with nvcc for each arch torch's CUDA wheels target (CUDA_ARCHS: sm_75,
# where the bfloat16 kernels compile to a trap, up to sm_120), on any machine: they include only CUDA
# headers. Fails on a compile error; skipped, saying so, where nvcc is missing.
CUDA_SOURCES := $(shell find csrc -name '*.cu' 2>/dev/null)
CUDA_ARCHS ?= 75 80 86 89 90a 100 120
# The torch binding of the CUDA kernels is syntax-checked against torch's headers too; a CPU torch
# lacks one header its CUDA build generates (c10/cuda/impl/cuda_cmake_macros.h): an empty stand-in.
# C++17 as the GPU machine's torch 2.11 builds it; torch 2.13's headers warn of C++20 extensions.
cuda-check: install
	@if command -v nvcc >/dev/null; then \
	  out=$$(mktemp -d) && for arch in $(CUDA_ARCHS); do for f in $(CUDA_SOURCES); do \
	    echo "nvcc sm_$$arch $$f" && nvcc -gencode=arch=compute_$$arch,code=sm_$$arch -std=c++17 -O3 -c $$f \
	      -o $$out/$$(basename $$f).$$arch.o || { rm -rf $$out; exit 1; }; \
	  done; done; \
	  cuda_include=$$(dirname $$(dirname $$(nvcc -v -E -x cu /dev/null 2>&1 | sed -n 's/^#\$$ TOP=//p')))/include; \
	  torch_include=$$($(PY) -c "import torch.utils.cpp_extension as e; print(' '.join('-I' + p for p in e.include_paths()))"); \
	  python_include=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])"); \
	  mkdir -p $$out/stub/c10/cuda/impl && echo '#pragma once' > $$out/stub/c10/cuda/impl/cuda_cmake_macros.h; \
	  echo "syntax check csrc/cuda_binding.cpp" && $(CXX) -std=c++17 -Wno-c++20-extensions -fsyntax-only -I$$out/stub $$torch_include \
	    -I$$python_include -I$$cuda_include -DTORCH_EXTENSION_NAME=_C csrc/cuda_binding.cpp || { rm -rf $$out; exit 1; }; \
	  rm -rf $$out; \
	else echo "cuda-check: nvcc not found, CUDA sources not compiled"; fi

# The cpu test suites on Linux aarch64, emulated by qemu-user (tools/aarch64_emulated.py): a Debian
# arm64 sysroot with Python 3.11, torch's aarch64 CPU wheel, the extension cross-compiled against it, and
# pytest under qemu-aarch64, all under build/aarch64 (about 1.8 GB). The host tools come from Debian's
# packages where missing (as root). 8 to 11 minutes, too long for CI, which runs test-aarch64-ci: the
# cpu attention, dropout and non-finite contracts (the README gives the last result of each). The speed
# probes are left out: 4.5 minutes emulated, for a speed that says nothing of an ARM CPU.
AARCH64_TESTS ?= $(CONTRACT_TESTS) tests/test_cpu_precision.py tests/test_non_finite.py tests/test_properties.py \
  tests/test_validation.py tests/test_dispatch.py tests/test_reference.py \
  --deselect tests/test_cpu_precision.py::test_the_probes_measure_a_speedup
AARCH64_CXX ?= aarch64-linux-gnu-g++
test-aarch64-ci: AARCH64_TESTS = tests/test_cpu_attention.py tests/test_dropout.py tests/test_non_finite.py
test-aarch64-ci: test-aarch64
test-aarch64:
	command -v qemu-aarch64 >/dev/null && command -v debootstrap >/dev/null && command -v $(AARCH64_CXX) >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq qemu-user debootstrap g++-aarch64-linux-gnu; }
	AARCH64_CXX=$(AARCH64_CXX) $(PYTHON) tools/aarch64_emulated.py -- -q $(AARCH64_TESTS)

check: install
	$(PY) -m perceiver_fast.kernels.compile_check --arch 90

# The quick benchmark set on the default device (CUDA when present): report-<device>.md,
# results-<device>.json and the plots in benchmarks/results. `perceiver-fast bench --help` for more.
report: install
	$(VENV)/bin/perceiver-fast bench --out benchmarks/results

# Everything a GPU machine runs, most valuable first, inside GPU_BUDGET_S seconds, each step logged under
# GPU_OUT; a failed step does not stop the rest (tools/gpu_run.py; docs/gpu.md). It uses PYTHON as it
# is and installs nothing: a GPU machine may reach no package index. It takes the prebuilt extension of
# .gpu-prebuilt/ where it matches. GPU_STEPS picks steps (build,smoke,tests,bench,flex,memcheck,model,
# racecheck; default all but racecheck). Without CUDA it prints a dry run of its steps and exits 0.
GPU_OUT ?= gpu-results
GPU_STEPS ?= build,smoke,tests,bench,flex,memcheck,model
GPU_BUDGET_S ?= 540
# The project's venv where there is one (a dry run on a developer's machine), else PYTHON (the GPU
# machine's own Python, which holds torch).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu:
	$(GPU_PYTHON) tools/gpu_run.py --out $(GPU_OUT) --steps $(GPU_STEPS) --budget-s $(GPU_BUDGET_S)

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(GPU_MACHINE_VENV) .gpu-prebuilt build *.egg-info .pytest_cache perceiver_fast/_C*.so
