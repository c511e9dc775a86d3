# `make demo` and `make test` create .venv if it is missing, install qshift into it, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qshift-installed

.PHONY: demo test test-fast install clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, by exact version: on these machines it installs from local disk
	$(BIN)/pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --disable-pip-version-check -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qshift demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  # the suite without the `slow` tests: about a minute
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
