# The two Quickstart commands, and what they need. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: local test setup clean

# Run the whole tutorial on this machine (no Azure account, no GPU, no Hub needed).
local: setup
	$(PY) -m local.pipeline

# Run the test suite.
test: setup
	$(PY) -m pytest

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

# Remove what runs wrote (data, models, MLflow store, scratch); keeps .venv and .env.
clean:
	rm -rf data outputs mlruns mlflow.db .scratch .promptflow
