# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The browser tests (omniboard, sacredboard) drive Debian's chromium with Playwright, never a
# browser that Playwright downloads.
CHROMIUM := /usr/bin/chromium

.PHONY: install demo test test-fast bench clean-venv

install: $(STAMP)

# Re-runs only when the dependency declarations change, so `make test` after the first
# time costs nothing.
$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=23.2"
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0 "setuptools<81"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,tune]'
	touch $(STAMP)

demo: install
	$(BIN)/medseg db start
	$(BIN)/python experiments/sadaan.py generate_data with demo
	$(BIN)/python experiments/sadaan.py with demo
	$(BIN)/medseg db status

test: install $(CHROMIUM)
	$(BIN)/python -m pytest -n 2 $(PYTEST_ARGS)

$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
	$$sudo apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium

test-fast: install
	$(BIN)/python -m pytest -n 2 -m "not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m benchmarks

clean-venv:
	rm -rf $(VENV)
