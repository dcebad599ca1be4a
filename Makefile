# The README's commands. Each target does its own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Lock files (pinned, with hashes; `make lock` writes them): dev is everything the venv holds,
# runtime the daemon's image, sandbox the sandbox's image, build the build backend (hatchling).
LOCKS := requirements/dev.txt requirements/runtime.txt requirements/sandbox.txt requirements/build.txt
PIP := $(PY) -m pip --disable-pip-version-check
UV_COMPILE := $(VENV)/bin/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock"
# The AsyncAPI CLI (npm), which validates docs/asyncapi.yaml in the tests.
NODE_TOOLS := tools/asyncapi
NODE_STAMP := $(NODE_TOOLS)/node_modules/.installed

.PHONY: help deps system-deps venv node-tools lock stack-up stack-down stack-status test test-unit lint fmt run bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# Exactly the locked versions, hash-checked; then the two projects themselves, editable, built
# with the locked hatchling (no build isolation, so nothing unpinned is fetched).
$(STAMP): pyproject.toml sandbox/pyproject.toml $(LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e . -e ./sandbox
	touch $(STAMP)

venv: $(STAMP)  ## virtualenv with the daemon, the sandbox and the dev tools, from the lock

# LOCK_ARGS=--upgrade moves every pin to the newest version the bounds allow;
# LOCK_ARGS="--upgrade-package aiohttp" only that one. Without it, pins move only where a bound
# in pyproject.toml no longer admits them. The other locks are cut from the dev lock.
lock: venv  ## recompile the lock files (requirements/*.txt) from the pyproject.toml bounds
	$(UV_COMPILE) $(LOCK_ARGS) --extra dev pyproject.toml sandbox/pyproject.toml \
		requirements/build.in -o requirements/dev.txt
	$(UV_COMPILE) -c requirements/dev.txt pyproject.toml -o requirements/runtime.txt
	$(UV_COMPILE) -c requirements/dev.txt sandbox/pyproject.toml -o requirements/sandbox.txt
	$(UV_COMPILE) -c requirements/dev.txt requirements/build.in -o requirements/build.txt

$(NODE_STAMP): $(NODE_TOOLS)/package.json $(NODE_TOOLS)/package-lock.json
	cd $(NODE_TOOLS) && npm ci --no-audit --no-fund --ignore-scripts --omit=optional --loglevel=error
	touch $(NODE_STAMP)

node-tools: system-deps $(NODE_STAMP)  ## the AsyncAPI CLI, from tools/asyncapi/package-lock.json

system-deps:  ## Debian packages: redis-server, Java, Maven, promtool, npm (apt-get when missing)
	./deploy/local/install-system-deps.sh

deps: system-deps venv node-tools  ## everything the tests and the demo need
	$(PY) deploy/local/stack.py fetch

stack-up: deps  ## start the local Kafka broker and Redis (idempotent)
	$(PY) deploy/local/stack.py up

stack-down:  ## stop the local stack; nothing is left running
	@if [ -x $(PY) ]; then $(PY) deploy/local/stack.py down; else $(PYTHON) deploy/local/stack.py down; fi

stack-status:  ## is the local stack up?
	$(PYTHON) deploy/local/stack.py status

# Test processes side by side (pytest-xdist): the daemon tests mostly wait (leases, grace
# periods, restarts), so two take about a third off the suite's time on two cores.
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: stack-up  ## the whole test suite against the real broker, Redis and the sandbox
	$(PY) -m pytest -n $(TEST_WORKERS)

test-unit: venv node-tools  ## only the tests that need no service
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

bench: stack-up  ## benchmarks: 1M-recipient campaigns (one text; languages; own codes), polls, outcomes, sandbox, history, load, takeover, receipts
	$(PY) bench/bench_campaign.py
	$(PY) bench/bench_variants.py
	$(PY) bench/bench_polls.py
	$(PY) bench/bench_outcomes.py
	$(PY) bench/bench_sandbox.py
	$(PY) bench/bench_history.py
	$(PY) bench/bench_load.py
	$(PY) bench/bench_takeover.py
	$(PY) bench/bench_receipts.py

clean: stack-down  ## stop the stack and remove caches (keeps Maven's jar cache)
	rm -rf .cache/stack .mypy_cache .ruff_cache .pytest_cache
