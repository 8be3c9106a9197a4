# Two commands: `make demo` and `make test`. Both create .venv with the pinned dependencies first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow test-gpu bench venv clean

venv: $(STAMP)

# torch==2.13.0 is pinned in requirements.lock and installed in the same pip command as
# everything that depends on it (an unpinned torch would pull a multi-GB CUDA build).
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/slimkit demo --out slimkit-out

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b --out benchmarks/results/$$(basename $$b .py).json || exit 1; done

clean:
	rm -rf $(VENV) slimkit-out
