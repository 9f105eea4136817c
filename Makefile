# Two commands from a fresh clone:
#   make demo   creates .venv, installs the pinned stack, runs the inference job on its embedded default
#   make test   same set-up, then the test suite (without the checks marked slow: make test-slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow bench clean

$(STAMP): requirements.lock setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	# The lpips package is the LPIPS tests' reference; its torchvision dependency is not needed.
	$(PY) -m pip install -q --no-deps lpips==0.1.4
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Image -> 3D on examples/images, then text -> 3D on two prompts with the toy image and video models
# of examples/ (examples/README.md says how each model was made).
demo: setup
	$(PY) -m vf3d_jax.infer --config configs/infer.py:demo --output outputs/demo
	$(PY) -m vf3d_jax.infer --config configs/infer.py:demo --output outputs/demo_text \
	  --prompt "a red cone on a blue box" --prompt "a yellow sphere"

test: setup
	$(PY) -m pytest -n 2 $(PYTEST_ARGS) tests

# The checks marked slow (several minutes of training each), left out of `make test`.
test-slow: setup
	$(PY) -m pytest -n 2 --dist load -m slow $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs *.egg-info
