# Two commands: `make upgrade` (set up + run the upgrade on the embedded default) and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV)/bin)
export PATH := $(BIN):$(PATH)
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup data upgrade repro test test-all test-long bench benchmark-quick benchmark-full mlflow-ui clean

setup: $(VENV)/.installed

# torch first, on its own: an unpinned torch pulled in by anything else would be a multi-GB CUDA build.
$(VENV)/.installed: requirements-torch.txt requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

# The raw KanjiVG strokes (base forms + Kaisho variants) come from the installed `kanjivg` package; data.dvc tracks them.
# A copy made before the Kaisho variants were copied too is replaced.
data: setup
	@test -f data/kanjivg/04e00.svg -a -f data/kanjivg/04e14-Kaisho.svg || $(PY) -m components.data.kanjivg data/kanjivg
	@test -d .dvc || dvc init -q
	dvc add -q data

upgrade: data
	mixbct upgrade

repro: data
	dvc repro

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m "(slow or not slow) and not long"

# The longest runs, kept out of CI's time budget: the behavioural test of the claim at default size (~9-18 min).
test-long: setup
	$(PY) -m pytest -q -m long

bench: setup
	$(PY) benchmarks/run.py step
	$(PY) benchmarks/run.py methods

# The paper's comparison (benchmarks/grid.yaml): resumable; writes results.md and the figures
# (quick: docs/quick/, full: docs/).
benchmark-quick: data
	mixbct benchmark --grid quick --report docs/quick

benchmark-full: data
	mixbct benchmark --grid full

mlflow-ui: setup
	mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf artifacts .prefect
