# Quick start: `make demo` and `make test` each do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out

.PHONY: setup demo demo-doc test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	DS_ACCELERATOR=cpu $(VENV)/bin/dipo-scale demo --out $(DEMO_OUT)

# docs/demo.md is written by the demo run itself (from its metrics.json), with the command and date.
demo-doc: setup
	DS_ACCELERATOR=cpu $(VENV)/bin/dipo-scale demo --out $(DEMO_OUT) --attacks quantize,relearn --doc docs/demo.md

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_OUT)
