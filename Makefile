# The README's commands. Each target does its own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help deps system-deps venv stack-up stack-down stack-status test test-unit lint fmt run bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)  ## virtualenv with the package and its dev tools

system-deps:  ## Debian packages: redis-server, Java, Maven, promtool (apt-get when missing)
	./deploy/local/install-system-deps.sh

deps: system-deps venv  ## everything the tests and the demo need
	$(PY) deploy/local/stack.py fetch

stack-up: deps  ## start the local Kafka broker and Redis (idempotent)
	$(PY) deploy/local/stack.py up

stack-down:  ## stop the local stack; nothing is left running
	@if [ -x $(PY) ]; then $(PY) deploy/local/stack.py down; else $(PYTHON) deploy/local/stack.py down; fi

stack-status:  ## is the local stack up?
	$(PYTHON) deploy/local/stack.py status

test: stack-up  ## the whole test suite against the real broker, Redis and the sandbox
	$(PY) -m pytest

test-unit: venv  ## only the tests that need no service
	$(PY) -m pytest -m "not integration"

lint: venv  ## ruff (lint + format check) and mypy strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: venv  ## format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

run: stack-up  ## the demo: sandbox + daemon + a sample campaign on the local stack (Ctrl-C stops)
	$(PY) deploy/local/demo.py $(ARGS)

bench: stack-up  ## benchmarks: 1M-recipient campaigns (one text; languages; own codes), 10,000 daily polls, the sandbox, history
	$(PY) bench/bench_campaign.py
	$(PY) bench/bench_variants.py
	$(PY) bench/bench_polls.py
	$(PY) bench/bench_sandbox.py
	$(PY) bench/bench_history.py

clean: stack-down  ## stop the stack and remove caches (keeps Maven's jar cache)
	rm -rf .cache/stack .mypy_cache .ruff_cache .pytest_cache
