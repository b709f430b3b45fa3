# Two commands do all set-up on a fresh machine (Python 3.10+ and the package registries):
#   make demo   creates .venv, installs fairdistill, runs the demo on the embedded data set
#   make test   creates .venv, installs the test extras, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: demo test install install-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml setup.py
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(PY) -m fairdistill demo

test: install-test
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/bench_kd.py

clean:
	rm -rf $(VENV) runs
