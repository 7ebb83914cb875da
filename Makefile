# `make run` and `make test` each set up everything on a fresh machine first
# (virtual env + editable install), then run.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pip on the development machines warns about every package missing from a local
# mirror; those lines are noise, errors still fail the build (pipefail).
PIP_FILTER := grep -v -e "is ignored: it is neither a file nor a directory" || true

.PHONY: install run test test-fast lint format ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | { $(PIP_FILTER); }
	touch $(STAMP)

install: $(STAMP)

## A real study on the embedded default (scikit-learn digits, no download). ARGS= adds overrides.
run: $(STAMP)
	$(PY) -m dtp_search $(ARGS)

## Lint and format check, then the whole test suite, one pytest-xdist worker per core (a worker
## that runs out of tests takes some of the other's queue, so that the long end-to-end runs do not
## leave a core idle at the end; a module-scoped study is built once per worker that needs it). `make test-fast` leaves
## out the end-to-end CLI runs marked slow.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n auto --dist worksteal

test-fast: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## The MLflow UI on this folder's default store, on 127.0.0.1 only (prints each study's runs URL first).
ui: $(STAMP)
	@$(PY) -c "from dtp_search.tracking import print_runs_urls; print_runs_urls('sqlite:///$(CURDIR)/dtp_runs/mlflow.db')"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/dtp_runs/mlflow.db --host 127.0.0.1 --port 5000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
