# The two front-door commands (README): `make demo` and `make test`. Both create .venv and
# install the package into it first; nothing is downloaded beyond the Python packages.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# This machine has a local CPU build of torch 2.13.0; elsewhere override, e.g. TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dcmkd demo

test: setup
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
