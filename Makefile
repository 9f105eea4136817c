# Two commands from a fresh clone:
#   make demo   creates .venv, installs the pinned stack, runs the inference job on its embedded default
#   make test   same set-up, then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

$(STAMP): requirements.lock setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m vf3d_jax.infer --config configs/infer.py:demo --output outputs/demo

test: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs *.egg-info
