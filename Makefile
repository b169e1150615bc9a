# The two entry points: `make demo` and `make test`. Both set up .venv first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PACKAGES := proto trainer server cli

.PHONY: venv demo test lint proto redis-server clean

venv: $(STAMP)

# --no-deps on the project's own distributions: their inter-dependencies are satisfied by the
# editable installs themselves and must never be looked up on a package index.
$(STAMP): requirements-dev.txt $(addsuffix /pyproject.toml,$(PACKAGES))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps $(addprefix -e ./,$(PACKAGES))
	touch $(STAMP)

# Tests start their own redis-server on a free port; install it when the machine lacks it.
redis-server:
	@command -v redis-server >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

demo: venv
	$(VENV)/bin/nrctl quickstart

lint: venv
	$(VENV)/bin/ruff check .
	cd proto && ../$(VENV)/bin/buf lint

test: venv redis-server lint
	$(PY) -m pytest -q tests

# Regenerate the committed gRPC stubs after editing a .proto.
proto: venv
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
