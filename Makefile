# `make demo` and `make test` create .venv if it is missing, install qshift into it, then run.
# pyproject.toml declares the supported version ranges; CI installs the exact versions of constraints/ci.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints/ci.txt
PIP := $(BIN)/pip install --disable-pip-version-check -q -c $(CONSTRAINTS)
STAMP := $(VENV)/.qshift-installed

.PHONY: demo test test-fast install clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, at the constraints' exact version: on these machines it installs from local disk
	$(PIP) torch torchvision
	$(PIP) -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qshift demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  # the suite without the `slow` tests: about 1.5 minutes on 2 cores
	$(BIN)/python -m pytest -q -m "not slow"

clean-venv:
	rm -rf $(VENV)
