# kansas: `make test` and `make run` do their own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The checkout on sys.path lets twistd find twisted/plugins/kansas_plugin.py.
export PYTHONPATH := $(CURDIR)

.PHONY: test lint typecheck unit run bench clean

$(BIN)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: lint typecheck unit

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests twisted bench
	$(BIN)/ruff format --check src tests twisted bench

typecheck: $(BIN)/.installed
	$(BIN)/mypy

unit: $(BIN)/.installed
	$(BIN)/pytest -q $(PYTEST_ARGS)

run: $(BIN)/.installed
	$(BIN)/python -m kansas.demo.stack

bench: $(BIN)/.installed
	$(BIN)/python bench/first_figure.py

format: $(BIN)/.installed
	$(BIN)/ruff format src tests twisted bench
	$(BIN)/ruff check --fix src tests twisted bench

clean:
	rm -rf $(VENV) .run build *.egg-info src/*.egg-info
