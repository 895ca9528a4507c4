# Quickstart: `make demo` (install + train the demo), `make test` (the whole suite; .ci/run calls it).
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo test lint bench bench-augment system-packages

install:
	$(PIP) install -e .

demo: install
	$(PYTHON) -m fastcls.train pipelines/demo.yaml

# The system packages (apt, as root; otherwise the command is printed), then the test extras
# with the real DALI CPU graph (~420 MB wheel) and FFCV (only when its headers are there;
# without them the FFCV tests are skipped and say why), then the suite in two pytest-xdist
# workers, whole files each (the suite is half waiting: subprocess starts, imports, JITs;
# 13 min instead of 22 on the 2-core CI machine; docs/development.md).
test:
	@if bash .ci/system-packages.sh; then extras=test,dali,ffcv; else extras=test,dali; fi; \
	echo "$(PIP) install -e '.[$$extras]'"; $(PIP) install -e ".[$$extras]"
	$(PYTHON) -m pytest -n 2 --dist loadfile tests

# ruff (pyflakes, import order, pycodestyle; .ci/ruff.toml): `make test` installs it (test extra)
lint:
	$(PYTHON) -m ruff check --config .ci/ruff.toml .

system-packages:
	bash .ci/system-packages.sh

bench: install
	$(PYTHON) benchmarks/loader.py --demo

bench-augment: install
	$(PYTHON) benchmarks/augment.py
