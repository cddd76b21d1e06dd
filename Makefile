# Two entry points: `make demo` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test deps qemu nbd strace lint bench bench-quick bench-goals clean

qemu:
	@command -v qemu-img >/dev/null 2>&1 || (apt-get update && apt-get install -y qemu-utils)

# NBD clients for the server's tests (nbdinfo, nbdcopy, nbdsh and libnbd's Python binding)
nbd:
	@(command -v nbdinfo >/dev/null 2>&1 && test -e /usr/lib/python3/dist-packages/nbd.py) || \
		(apt-get update && apt-get install -y libnbd-bin python3-libnbd)

# strace counts qemu-img's writes and syncs in the benchmark report
strace:
	@command -v strace >/dev/null 2>&1 || (apt-get update && apt-get install -y strace)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

deps: qemu nbd $(STAMP)

test: deps strace
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q -n 2 tests

demo: deps strace
	$(PY) demo/demo.py

# docs/benchmarks.md, its plots, benchmarks/results/latest.json (see benchmarks/README.md)
bench: deps strace
	$(PY) benchmarks/run_all.py

bench-quick: deps strace
	BENCH_QUICK=1 $(PY) benchmarks/run_all.py

# the older per-module benchmarks, each held to a goal (benchmarks/out/results.md)
bench-goals: deps
	$(PY) benchmarks/goals.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
