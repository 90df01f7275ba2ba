# One entry point for people and CI. `make run` starts a station daemon on the
# zero-config default; `make test` runs everything CI runs (.ci/run calls exactly it).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest bench system-deps clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; \
	    $(PYTHON) -m venv $(VENV); \
	  else echo "python3 -m venv failed: install the python3-venv package" >&2; exit 1; fi; }
	@$(BIN)/python -m pip install -q --upgrade pip >&2
	@$(BIN)/python -m pip install -q -e '.[dev]' --config-settings editable_mode=compat >&2
	@touch $@

run: $(STAMP)
	$(BIN)/invsyncd

# Server binaries the tests start for real (PostgreSQL, nftables for network faults).
system-deps:
	@sh .ci/system-deps.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: system-deps lint typecheck pytest

bench: $(STAMP)
	@$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
