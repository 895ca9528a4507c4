# Quickstart: `make demo` (install + train the demo), `make test` (the whole suite; .ci/run calls it).
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test bench

install:
	$(PIP) install -e .

demo: install
	$(PYTHON) -m fastcls.train pipelines/demo.yaml

test:
	$(PIP) install -e '.[test,dali,ffcv]'  # CI tests the real DALI CPU graph (~420 MB wheel) and FFCV
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) benchmarks/loader.py --demo

.PHONY: bench-augment
bench-augment: install
	$(PYTHON) benchmarks/augment.py
