# make demo | make test | make bench | make docs — each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test bench eval-inversion eval-e2e eval-e2e-heldout eval-demo-peers docs lint clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/qsmkit demo --out demo-output

test: $(VENV)/.installed
	$(PY) -m pytest -q

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/run.py

# dipole inversion suite (benchmarks/eval): cases x qsmkit and QSM.rs methods, table and figure
eval-inversion: $(VENV)/.bench
	$(PY) -m benchmarks.eval.run

# end-to-end suite (benchmarks/e2e.py): full head simulations, qsmkit vs QSM.rs, truth substitution
eval-e2e: $(VENV)/.bench
	$(PY) -m benchmarks.e2e

# the same on the held-out geometries (benchmarks/e2e_cases.py HELDOUT_CASES): rows in
# bench-output/e2e/heldout.json, no table or figure (the README's is a selection of its rows)
eval-e2e-heldout: $(VENV)/.bench
	$(PY) -m benchmarks.e2e --cases 3T-1.5mm-tilt-snr50-3echo 3T-2mm-z 3T-1mm-z-1echo \
		7T-1.2x1.2x2mm-tilt-snr40-3echo 3T-1mm-tilt --part heldout

# make demo's phantom with QSM.rs pipelines side by side (benchmarks/demo_peers.py; about 16 min)
eval-demo-peers: $(VENV)/.bench
	$(PY) -m benchmarks.demo_peers

# the API reference (Sphinx, from the numpy-style docstrings) in docs/_build/html
docs: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[docs]"
	$(VENV)/bin/sphinx-build -q -b html docs docs/_build/html
	@echo "API reference: docs/_build/html/index.html"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check QSMExtension Testing benchmarks

clean:
	rm -rf demo-output bench-output .pytest_cache docs/_build
