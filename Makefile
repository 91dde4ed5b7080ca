# The whole set-up on a fresh machine with only python3:  make demo  /  make test
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps make a second call fast: reinstall only when pyproject.toml changed.
$(VENV)/.stamp-install: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@ $(VENV)/.stamp-install

demo: $(VENV)/.stamp-install
	$(BIN)/python -m raydino.pretrain

test: $(VENV)/.stamp-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The inner loop: no Ray, no servers, no subprocess clusters (about 2 minutes on 2 cores).
test-fast: $(VENV)/.stamp-test
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

# The rules a machine checks: formatting, lint, and the import contracts in pyproject.toml.
lint: $(VENV)/.stamp-test
	$(BIN)/ruff format --check raydino tests tools
	$(BIN)/ruff check raydino tests tools
	$(BIN)/lint-imports

bench: $(VENV)/.stamp-install
	$(BIN)/python -m raydino.bench all

clean:
	rm -rf $(VENV) .raydino runs
