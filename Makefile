# `make test` and `make demo` build .venv from nothing; torch is pinned to the CPU build on this disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: test install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PIN)
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -n auto -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
