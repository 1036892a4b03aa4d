# `make demo` and `make test` are all a newcomer needs; both create .venv when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Seven strategies and the planner's choice side by side on the demo's GPT (configs/compare/demo.toml):
# a table, and report.html in the new runs/compare-<time>/ (about 5 minutes on 2 cores).
demo: $(STAMP)
	$(VENV)/bin/paratrain calibrate --if-missing
	$(VENV)/bin/paratrain compare configs/compare/demo.toml

# Two pytest workers: most tests wait on worker processes starting, timeouts and heartbeats, so
# on 2 cores two at a time take about 0.7 of the time one at a time does (measured).
WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n $(WORKERS)

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs
