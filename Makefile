# Two entry points: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test deps qemu nbd lint bench clean

qemu:
	@command -v qemu-img >/dev/null 2>&1 || (apt-get update && apt-get install -y qemu-utils)

# NBD clients for the server's tests (nbdinfo, nbdcopy, nbdsh and libnbd's Python binding)
nbd:
	@(command -v nbdinfo >/dev/null 2>&1 && test -e /usr/lib/python3/dist-packages/nbd.py) || \
		(apt-get update && apt-get install -y libnbd-bin python3-libnbd)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

deps: qemu nbd $(STAMP)

test: deps
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -n 2 tests

demo: deps
	$(PY) demo/demo.py

bench: deps
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
