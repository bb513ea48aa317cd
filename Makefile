# Set-up commands for a fresh machine (Python 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow install install-test lint clean docs

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

install: $(PY)
	$(PY) -m pip install -e .

install-test: $(PY)
	$(PY) -m pip install -e ".[test]"

## make demo: create .venv, install, build a ~50k-cell synthetic atlas store, run kd.de on the embedded LocalCluster
demo: install
	$(VENV)/bin/kompot-dask demo

## make test: install the test extras (incl. the kompot 0.8.0 reference oracle) and run the suite
test: install-test
	$(PY) -m pytest -q -m "not slow"

## make test-slow: the heavier cases kept out of `make test` (kompot parity of niche options, real SIGKILLs)
test-slow: install-test
	$(PY) -m pytest -q -m slow

## make docs: render docs/tutorial.md (kompot's advanced tutorial on a zarr store) and the images of docs/plots.md
docs: install-test
	$(PY) docs/make_tutorial.py
	PYTHONPATH=. $(PY) docs/make_plot_images.py

lint: install-test
	$(VENV)/bin/ruff check kompot_dask tests benchmarks

clean:
	rm -rf demo_data .pytest_cache
