# The one entry point. `make run` and `make test` install on first use (a stamp target),
# so a second call installs nothing and works offline.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-quick lint bench docs docs-build clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/humanconnect up

test: $(STAMP)
	$(BIN)/pytest -q --durations=25 $(PYTEST_ARGS)

# The edit-test loop: everything but the chaos runs, fuzzing and long bursts.
test-quick: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

# The documentation site (docs/, mkdocs.yml): served with live reload, or built as CI does.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) var site .pytest_cache .mypy_cache .ruff_cache
