# The two commands a newcomer types: `make demo` and `make test`.
# Both create .venv on a fresh machine; nothing is installed by hand.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= demo-sweep

.PHONY: demo test lint venv bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files record which extras are installed, re-run when pyproject changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/python -m tilesweep.demo --dir $(DEMO_DIR)

# Lint first (seconds): ruff for bugs pyflakes and bugbear see, then mypy; settings in pyproject.toml.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/plan.py
	$(BIN)/python benchmarks/queue_bench.py
	$(BIN)/python benchmarks/render.py
	$(BIN)/python benchmarks/model.py
	$(BIN)/python benchmarks/fetch.py  # needs nginx, curl and aria2c (apt-get install nginx aria2)
	$(BIN)/python benchmarks/predict.py  # needs nginx
	$(BIN)/python benchmarks/memory.py  # needs nginx

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache build src/*.egg-info
