# The two commands a new user needs: `make vm-test` (the main job) and `make test` (everything).
# Both install what they need first (`make deps`), idempotently, into the cache outside the repo.
SHELL := /bin/bash
PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
VMTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: all deps vm-test run test unit lint bench misbehave clean help

all: help

help:
	@echo "make vm-test   boot a guest against the device and run the end-to-end plan"
	@echo "make run       boot the guest with the device and keep it running (its shell here)"
	@echo "make test      lint + unit tests + VM tests (installs dependencies first)"
	@echo "make unit      fast tests only"
	@echo "make bench     benchmarks (side-by-side tables)"
	@echo "make misbehave the misbehaving-device catalogue on kernels 7.3.4, 6.12 and 6.1"
	@echo "make deps      install/verify dependencies (pinned, cached in ~/.cache/harness)"

deps:
	$(PYTHON3) -m harness.deps
	$(PY) -m harness.vfu.build
	$(PY) -m harness.guest

vm-test: deps
	$(PY) -m harness vm-test $(VMTEST_ARGS)

run: deps
	$(PY) -m harness run $(RUN_ARGS)

lint: deps
	$(VENV)/bin/ruff check harness tests .ci
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict tests .ci/merge_junit.py

unit: deps
	$(PY) -m pytest -q tests/unit

test: lint
	$(PY) -m pytest tests --junitxml=build/pytest-junit.xml

bench: deps
	$(PY) -m harness bench iova
	$(PY) -m harness.bench.dmamap
	$(PY) -m harness.bench.rrpath
	$(PY) -m harness.bench.rrpath --idle 100
	$(PY) -m harness.bench.roundtrip
	$(PY) -m harness bench net --config plain,offloads,viommu --full

# Every kernel even when one differs from its baseline; fails if any did.
misbehave: deps
	rc=0; for k in "" debian:6.12 debian:6.1; do \
	  $(PY) -m harness misbehave --all $${k:+--kernel $$k} || rc=1; done; exit $$rc

clean:
	rm -rf build
