# segldm: the two set-up commands are `make train` and `make test`; both create .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: train train-autoencoder train-ldm test test-slow lint mlflow-ui clean help

help:
	@echo "make train      install, then train both stages on the built-in data (quickstart)"
	@echo "make test       install dev extras, then run the test suite"
	@echo "make test-slow  the slow end-to-end tests"
	@echo "make lint       ruff"
	@echo "make mlflow-ui  open MLflow over outputs/mlflow.db"

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

train: train-autoencoder train-ldm

train-autoencoder: $(STAMP)
	$(PY) -m segldm.train experiment=quickstart_autoencoder $(ARGS)

train-ldm: $(STAMP)
	$(PY) -m segldm.train experiment=quickstart $(ARGS)

test: $(DEV_STAMP)
	$(PY) -m pytest -q

test-slow: $(DEV_STAMP)
	$(PY) -m pytest -q -m slow

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check segldm tests

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db

clean:
	rm -rf outputs/quickstart outputs/runs outputs/multiruns
