# The two Quickstart commands, and what they need. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The local endpoint's server, azmlinfsrv, pins packages .venv cannot share: it gets its own
# virtualenv, which then sees .venv's packages (mlflow, transformers, torch) after its own.
SERVER_VENV := .venv-azmlinfsrv
# Step 4b's chat on Microsoft Agent Framework needs OpenTelemetry newer than promptflow allows: its own
# virtualenv, with nothing of .venv's.
AGENT_VENV := .venv-agent

.PHONY: local test setup clean

# Run the whole tutorial on this machine (no Azure account, no GPU, no Hub needed); MODEL=phi4: with a
# tiny Phi-4-mini instead of a tiny Phi-3.
MODEL ?= phi3
local: setup
	$(PY) -m local.pipeline --model $(MODEL)

# Run the test suite.
test: setup
	$(PY) -m pytest

setup: $(VENV)/.installed $(SERVER_VENV)/.installed $(AGENT_VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(SERVER_VENV)/.installed: serving/requirements-azmlinfsrv.txt $(VENV)/.installed
	test -x $(SERVER_VENV)/bin/python || $(PYTHON) -m venv $(SERVER_VENV)
	rm -f $(SERVER_VENV)/lib/python*/site-packages/finetune_phi_main_venv.pth
	$(SERVER_VENV)/bin/python -m pip install --quiet -r serving/requirements-azmlinfsrv.txt
	$(SERVER_VENV)/bin/python -m pip check
	$(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > \
	  "$$($(SERVER_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/finetune_phi_main_venv.pth"
	touch $@

# Built anew whenever its pins change, so that nothing of older pins stays (pip install only adds and upgrades).
$(AGENT_VENV)/.installed: chat/requirements-agent.txt
	rm -rf $(AGENT_VENV)
	$(PYTHON) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AGENT_VENV)/bin/python -m pip install --quiet -r chat/requirements-agent.txt
	$(AGENT_VENV)/bin/python -m pip check
	touch $@

# Remove what runs wrote (data, models, MLflow store, scratch); keeps .venv and .env.
clean:
	rm -rf data outputs mlruns mlflow.db .scratch .promptflow
