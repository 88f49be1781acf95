# make demo | make test | make build | make bench | make sanitize-cpu | make sanitize (GPU) | make gpu-check (GPU)
# | make clean
# Every target sets up .venv/ on first use (dependencies from constraints.txt, then the
# extension built with --no-build-isolation) and reuses it afterwards.

PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip --disable-pip-version-check
CMAKE_BUILD := build/cmake
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' -o -name '*.h') setup.py tools/cuda_toolkit.py

.PHONY: all setup build demo test test-python test-cpp test-sanitize-cpu sanitize-cpu bench sanitize gpu-check \
	test-gpu-check clean
all: test

# What `make demo` needs (the package's own dependencies and the `demo` extra), then what the tests need on top:
# a first `make demo` skips installing the test tools (about 18 s of its 85 s here).
$(VENV)/.deps-demo: constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt --upgrade pip setuptools wheel ninja
	$(PIP) install -q -c constraints.txt torch torchvision numpy safetensors tqdm open_clip_torch matplotlib
	touch $@

$(VENV)/.deps-installed: $(VENV)/.deps-demo
	$(PIP) install -q -c constraints.txt cmake pytest hypothesis pytest-benchmark scipy scikit-learn faiss-cpu torchmetrics transformers
	touch $@

# --no-deps: the dependencies are installed above, pinned; --no-build-isolation: reuse that torch.
$(VENV)/.ext-built: $(VENV)/.deps-installed $(CSRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import bayesvlm_ext as b; print('bayesvlm_ext', b.__version__, 'compiled:', b.build_info())"
	touch $@

setup: $(VENV)/.ext-built
build: setup

# `make demo` builds what the demo needs: the CPU kernels, and the CUDA ones only where a GPU is visible
# (nvidia-smi -L) or BAYESVLM_EXT_FORCE_CUDA=1. A full build (make build / test, which CI runs, so a CUDA
# compile error still fails it) is reused when it is current; a CPU-only build removes the full build's stamp,
# so that `make test` compiles the CUDA kernels again.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
DEMO_FORCE_CPU := $(if $(HAS_GPU)$(filter 1 true yes on,$(BAYESVLM_EXT_FORCE_CUDA)),0,1)
$(VENV)/.ext-built-demo: $(VENV)/.deps-demo $(CSRC)
	@if [ -f $(VENV)/.ext-built ] && [ -z "$$(find $(CSRC) -newer $(VENV)/.ext-built)" ]; then \
		echo "demo: reusing the full build"; \
	else \
		rm -f $(VENV)/.ext-built; \
		echo "demo: building the extension (BAYESVLM_EXT_FORCE_CPU=$(DEMO_FORCE_CPU))"; \
		BAYESVLM_EXT_FORCE_CPU=$(DEMO_FORCE_CPU) $(PIP) install -q --no-build-isolation --no-deps -e . && \
		$(PY) -c "import bayesvlm_ext as b; print('bayesvlm_ext', b.__version__, 'compiled:', b.build_info())"; \
	fi
	touch $@

demo: $(VENV)/.ext-built-demo
	$(PY) -m bayesvlm_ext.demo

test-cpp: setup
	mkdir -p build
	$(VENV)/bin/cmake -S . -B $(CMAKE_BUILD) -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" $$($(PY) tools/cuda_toolkit.py --cmake) > $(CMAKE_BUILD).configure.log 2>&1 || (cat $(CMAKE_BUILD).configure.log; exit 1)
	$(VENV)/bin/cmake --build $(CMAKE_BUILD) -j 2
	cd $(CMAKE_BUILD) && ../../$(VENV)/bin/ctest --output-on-failure

test-python: setup
	$(PY) -m pytest tests

test: test-cpp test-python test-sanitize-cpu test-gpu-check

# The CPU kernels under AddressSanitizer + UBSan (setup.py's BAYESVLM_EXT_SANITIZE), built beside the normal
# extension in build/asan/ and loaded in its place through BAYESVLM_EXT_LIBRARY. Python itself is not
# instrumented, so libasan is preloaded, with libstdc++ (else ASan cannot find the real __cxa_throw and a
# C++ exception aborts). Any out-of-bounds access or undefined operation aborts the run; --capture=sys leaves
# file descriptor 2 alone, so the sanitizer's report is printed rather than lost with pytest's capture.
ASAN_LIB_DIR := build/asan/lib
OP_TESTS := tests/test_op_kron_quadform.py tests/test_op_item_stats.py tests/test_op_pairwise_moments.py \
	tests/test_op_topk_moments.py tests/test_ops_compile.py tests/test_projected.py
SANITIZE_CPU_TESTS := $(OP_TESTS) tests/test_degenerate.py tests/test_fuzz.py \
	tests/test_retrieval.py tests/test_index.py -q -p no:cacheprovider --capture=sys
sanitize-cpu: $(VENV)/.deps-installed $(CSRC)
	mkdir -p build
	BAYESVLM_EXT_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(ASAN_LIB_DIR) --build-temp build/asan/tmp \
		> build/asan.log 2>&1 || (cat build/asan.log; exit 1)

test-sanitize-cpu: setup sanitize-cpu
	BAYESVLM_EXT_LIBRARY="$$(ls $(ASAN_LIB_DIR)/bayesvlm_ext/_C*.so)" \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:protect_shadow_gap=0 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(PY) -m pytest $(SANITIZE_CPU_TESTS)

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only

# On a GPU machine: every CUDA kernel under compute-sanitizer (memcheck, then racecheck for shared memory).
SANITIZE_TESTS := $(OP_TESTS) tests/test_kernel_variants.py -k cuda -x -q -p no:cacheprovider
sanitize: setup
	compute-sanitizer --tool memcheck --error-exitcode 1 $(PY) -m pytest $(SANITIZE_TESTS)
	compute-sanitizer --tool racecheck --error-exitcode 1 $(PY) -m pytest $(SANITIZE_TESTS)

# On a machine with a GPU, one call (under 9 minutes on an H100/H200): the extension built for that GPU, every
# CUDA test, compute-sanitizer memcheck and racecheck over every CUDA kernel (tests/test_kernel_variants.py)
# and the GPU benchmark report; logs, JUnit files, the benchmark JSON and summary.json in GPU_CHECK_OUT
# (tools/gpu_check.sh). It needs no .venv: PYTHON is .venv's interpreter where there is one, else python3
# (with torch). Without a GPU it runs the CPU-side steps and records the others as "skipped: no GPU".
GPU_CHECK_OUT ?= build/gpu-check
PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	PYTHON="$(PYTHON)" bash tools/gpu_check.sh "$(GPU_CHECK_OUT)"

# CI: gpu-check's dry form (nothing built, no GPU needed): each step's command resolves, pytest collects the
# CUDA cases and the GPU benchmarks (about 30 s).
test-gpu-check: setup
	PYTHON="$(PY)" bash tools/gpu_check.sh --dry-run build/gpu-check-dry

clean:
	rm -rf build $(VENV) *.egg-info bayesvlm_ext/_C*.so
