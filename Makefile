# Two entry points (README): `make reproduce` runs the main job, `make test` runs the tests.
# Both create/refresh .venv and install the pinned dependencies first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
export MHMOE_DATA_ROOT ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: venv test reproduce parity bench clean

$(VENV)/.stamp: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

venv: $(VENV)/.stamp

test: venv
	$(PY) -m pytest -q -n 2 --dist loadfile tests

reproduce: venv
	$(VENV)/bin/mhmoe reproduce --preset demo --workers 2 --out runs/demo

parity: venv
	$(VENV)/bin/mhmoe parity --dim 768 --hidden-dim 2048 --num-experts 8 --top-k 1 --heads 2
	$(VENV)/bin/mhmoe parity --dim 768 --hidden-dim 2048 --num-experts 8 --top-k 1 --heads 3

bench: venv
	$(PY) benchmarks/layers.py

clean:
	rm -rf $(VENV) .pytest_cache
