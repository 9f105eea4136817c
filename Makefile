# Two commands from a fresh clone:
#   make demo   creates .venv, installs the pinned stack, runs the inference job on its embedded default
#   make test   same set-up, then the test suite (without the checks marked slow: make test-slow)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup browser demo test test-slow bench clean

$(STAMP): requirements.lock setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	# The lpips package is the LPIPS tests' reference; its torchvision dependency is not needed.
	$(PY) -m pip install -q --no-deps lpips==0.1.4
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP) browser

# The web app's browser tests (tests/test_app.py) drive Debian's headless Chromium; installed
# here when it is missing (as root, or with sudo), else those tests skip.
CHROMIUM ?= /usr/bin/chromium
NO_BROWSER := chromium could not be installed (needs Debian's apt-get, as root or with sudo): \
  the browser tests of tests/test_app.py will be skipped

browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	  else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null 2>&1; then \
	    $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq chromium chromium-driver >/dev/null || true; \
	  fi; \
	  [ -x $(CHROMIUM) ] || echo "$(NO_BROWSER)"; \
	fi

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
