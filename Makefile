# The two front-door commands (README): `make demo` and `make test`. Both create .venv and
# install the package into it first; nothing is downloaded beyond the Python packages.
VENV  ?= .venv
PY    := $(VENV)/bin/python
# The demo needs torch only: this machine has a local CPU build of torch 2.13.0 (small, quick to
# install); elsewhere override, e.g. TORCH=torch. The tests also run the detection, face and
# timm/torchvision code, which needs torchvision: the registry's torchvision does not load beside
# that local torch, so the tests pin the pair below (both on this machine's local mirror);
# elsewhere override, e.g. VISION="torch torchvision".
TORCH ?= torch==2.13.0
VISION ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[train]"
	touch $@

# the tests' extras (torchvision, timm, pycocotools) with the torch/torchvision pair they need
$(VENV)/.installed-test: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torchvision" 2>/dev/null || $(PY) -m pip install -q $(VISION)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/dcmkd demo

# DCMKD_REQUIRE_EXTRAS: a test dependency that does not load fails the run (tests/conftest.py)
# instead of skipping the tests that need it
test: $(VENV)/.installed-test
	DCMKD_REQUIRE_EXTRAS=1 $(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
