# Two commands for a fresh machine: `make train` and `make test`; each installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU default: the torch wheel this platform ships. On a CUDA host, install your CUDA torch into
# .venv first (or set VENV to an environment that has it): an installed torch is always kept.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
EXP ?= mixtral_small
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: install train test test-fast test-numerics test-gpu bench lint format corpus clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# A torch already in the venv (e.g. a CUDA build the user installed) is kept and pinned;
	# otherwise TORCH_SPEC (the CPU wheel here) is installed and pinned by constraints.txt.
	if $(PY) -c "import torch" 2>/dev/null; then \
	  $(PY) -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-constraint.txt; \
	  echo "keeping the installed $$(cat $(VENV)/torch-constraint.txt)"; \
	elif [ -n "$(TORCH_SPEC)" ]; then \
	  $(PY) -m pip install -q "$(TORCH_SPEC)" && cp constraints.txt $(VENV)/torch-constraint.txt; \
	else \
	  : > $(VENV)/torch-constraint.txt; \
	fi
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[dev]"
	touch $(STAMP)

train: install
	$(PY) -m moetrain.train +experiment=$(EXP) $(ARGS)

# Two pytest workers (TEST_WORKERS=1 for one): most of a test's time is a training subprocess starting
# (imports on one core), so two workers overlap them; --dist loadfile keeps a file's tests, and the
# training runs they share (moetrain.testing.cached_run), in one worker.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not gpu and not slow and not multiprocess" $(ARGS)

# The floating-point comparisons (pytest -m numerics) again, e.g. `MKL_CBWR=AVX2 make test-numerics`:
# MKL_CBWR picks another MKL code path on the same CPU, so a tolerance that holds on one CPU only
# fails here before it lands (.ci/run runs AVX2 and COMPATIBLE after the full suite).
ifdef MKL_CBWR
export MKL_CBWR
endif
test-numerics: install
	@echo "numerics tests with MKL_CBWR=$${MKL_CBWR:-<unset: MKL's default for this CPU>}"
	$(PY) -m pytest -q -m numerics $(ARGS)

test-gpu: install
	$(PY) -m pytest -q -m gpu -rs $(ARGS)

# Speed, side by side in one process (ratios, never timed tests). On a GPU host the layer benchmark
# runs on CUDA; results with their machine and command: benchmarks/results/ (index: benchmarks/README.md),
# docs/GPU.md.
# ARGS go to the layer benchmark (e.g. ARGS=--quick), TRAIN_ARGS to the training-step benchmark.
bench: install
	mkdir -p benchmarks/results
	$(PY) benchmarks/bench_moe_layer.py --threads $(OMP_NUM_THREADS) --json benchmarks/results/layer.json $(ARGS)
	$(PY) benchmarks/bench_train_step.py --threads $(OMP_NUM_THREADS) --json benchmarks/results/train_step.json $(TRAIN_ARGS)
	$(PY) benchmarks/plot_bench.py benchmarks/results/layer.json benchmarks/results/train_step.json --out benchmarks/results/bench.png

lint: install
	$(VENV)/bin/ruff check moetrain tests benchmarks scripts
	$(VENV)/bin/ruff format --check moetrain tests benchmarks scripts

format: install
	$(VENV)/bin/ruff check --fix moetrain tests benchmarks scripts
	$(VENV)/bin/ruff format moetrain tests benchmarks scripts

corpus: install
	$(PY) -m moetrain.data.corpus

clean:
	rm -rf $(VENV) outputs .pytest_cache
