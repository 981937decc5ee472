# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Both create .venv on first use; torch is pinned to the CPU wheel this project is built with.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-fast bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,dashboard]'
	touch $(STAMP)

install: $(STAMP)

demo: install  ## the built-in default sweep (synthetic data, FPT+ and linear probe, 8 trials)
	$(BIN)/medsweep sweep

RUFF = $(BIN)/ruff check medsweep tests bench

lint: install  ## ruff and mypy, configured in pyproject.toml
	$(RUFF)
	$(BIN)/mypy

# mypy (~40 s of one core, cold) runs beside the suite rather than before it: the suite leaves a core idle
# while a process imports or a test runs alone. Its report follows the suite's; either failing fails.
test: install  ## ruff, then mypy beside the whole suite, slow end-to-end tests included (as CI runs it)
	$(RUFF)
	@$(BIN)/mypy > $(VENV)/mypy.log 2>&1 & types=$$!; \
	$(BIN)/python -m pytest; tests=$$?; \
	wait $$types; typed=$$?; echo "mypy:"; cat $(VENV)/mypy.log; \
	exit $$(( tests != 0 || typed != 0 ))

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

bench: install
	$(BIN)/python -m bench.run

bench-quick: install
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) .medsweep-cache sweeps runs .mypy_cache .ruff_cache
