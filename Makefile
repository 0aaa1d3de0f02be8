# pretrain: one entry point for install, demo, tests and lint.
# The virtual environment lives in the checkout (.venv); torch is pinned through
# constraints.txt so that a CPU machine never pulls CUDA wheels.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# DeepSpeed builds its ops just in time; never at install.
export DS_BUILD_OPS := 0
# A persistent cache for DeepSpeed's/torch's JIT-built C++ ops (shm comm op).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/pretrain/torch_extensions
export WANDB_MODE ?= offline

.PHONY: install demo test test-unit test-distributed test-integration lint format bench clean \
	gpu-wheels gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m pretrain.demo

# One pytest-xdist worker per core (at most 4): most tests wait on child processes that run one
# thread each. --dist loadscope: each module runs in one worker, so its module-scoped runs
# happen once (xdist's loadgroup marks have no effect under pytest 9.2: it renames a node id
# through an attribute pytest no longer reads). 9-12 minutes on 2 quiet cores.
test: install
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadscope tests

test-unit: install
	$(PY) -m pytest -q -m unit tests

test-distributed: install
	$(PY) -m pytest -q -m distributed tests

test-integration: install
	$(PY) -m pytest -q -m integration tests

lint: install
	$(VENV)/bin/ruff format --check pretrain tests benchmarks
	$(VENV)/bin/ruff check pretrain tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo  # the layer contract in pyproject.toml; fails on a cycle
	$(VENV)/bin/hadolint docker/Dockerfile

format: install
	$(VENV)/bin/ruff format pretrain tests benchmarks
	$(VENV)/bin/ruff check --fix pretrain tests benchmarks

# The figures in BENCHMARKS.md, each from its own command (about two hours on 2 cores; the
# export benchmark needs ~13 GB of scratch space under /tmp).
bench: install
	test -f data/demo/manifest.json || $(PY) -m pretrain.prepare output=data/demo tokenizer.vocab_size=2048
	$(PY) -m benchmarks.bench_data --rounds 3
	$(PY) -m benchmarks.bench_order --steps 400
	$(PY) -m benchmarks.bench_train --data data/demo --steps 40
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_strategies.py
	$(PY) -m benchmarks.bench_hf export --model gpt2-1.5b
	$(PY) -m benchmarks.bench_hf eval --data data/demo --model small10m
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.bench_optim --model tiny --vocab 8192 --steps 50 --rounds 7
	$(PY) -m benchmarks.bench_memory
	test -f data/compress-bench/manifest.json || $(PY) -m pretrain.prepare output=data/compress-bench \
		tokenizer.vocab_size=2048 val_min_documents=10 val_min_tokens=30000
	$(PY) -m benchmarks.bench_compress --data data/compress-bench --steps 120 --finetune-steps 20 \
		--rounds 3 --threads 1
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.bench_loss --batches 1,4 --repeats 0

# ---- on a machine with a GPU -------------------------------------------------------------
# `make gpu-wheels` here (it has pip), then on the GPU machine, in a copy of this checkout with
# .whl/: `make gpu-check`: the gpu test tier and the GPT-2 124M tokens/s and MFU benchmark.
# The GPU machine's own python (its CUDA torch) is used, not .venv.
GPU_PY ?= python3
WHEELS := benchmarks/gpu-wheels.txt

gpu-wheels:
	mkdir -p .whl
	# All pure Python: wheels built here (antlr4's 4.9.3 is a source release only) install there.
	grep -v '^#' $(WHEELS) | xargs $(PYTHON) -m pip wheel -q --no-deps -w .whl

gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --target /tmp/pretrain-site .whl/*.whl; fi
	PYTHONPATH=/tmp/pretrain-site:$(CURDIR) $(GPU_PY) -m pytest -q -p no:cacheprovider -m gpu tests/gpu
	PYTHONPATH=/tmp/pretrain-site:$(CURDIR) $(GPU_PY) -m benchmarks.bench_gpu --micro 16 32

clean:
	rm -rf $(VENV) runs outputs wandb .pytest_cache
