# `make test` and `make demo` build .venv from nothing; torch is pinned to the CPU build on this disk.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0

.PHONY: test lint install browser demo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]' $(TORCH_PIN)
	# tokenizer oracle for tests/test_tokenizer_icetk.py; --no-deps: icetk would pull torchvision, SAT deepspeed
	$(PY) -m pip install -q --no-deps icetk==0.0.7 SwissArmyTransformer==0.2.12
	touch $@

install: $(VENV)/.installed browser

# tests/serve/test_playground.py drives Debian's chromium through chromedriver (selenium); CI runs as
# root on a fresh Debian machine. Nothing to do when both are there already.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver > /dev/null)

test: install lint
	$(PY) -m pytest -n auto -q

# Style and layering: ruff's rules (pyproject.toml [tool.ruff]) and the import contracts
# ([tool.importlinter]: each package imports only the layers below it).
lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

# Fetch the bilingual demo corpus, train a tokenizer and a small GLM, write runs/demo/REPORT.md.
# Only what the demo needs (not the test tools), so a fresh clone starts training within ~2 minutes.
$(VENV)/.demo-installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[demo]' $(TORCH_PIN)
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/glm130b demo --out runs/demo

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
