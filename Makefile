# The two entry points: `make demo` and `make test`. Both set up .venv first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PACKAGES := core client trainer server cli
# checkov pins versions that would downgrade the project's own (packaging, networkx, importlib-metadata...): it
# lives in a venv of its own, used by `make lint` only.
LINT_VENV ?= .venv-lint
LINT_STAMP := $(LINT_VENV)/.installed-stamp
K8S_RENDERED := build/k8s

.PHONY: venv demo test lint proto system-packages clean

venv: $(STAMP)

# --no-deps on the project's own distributions: their inter-dependencies are satisfied by the
# editable installs themselves and must never be looked up on a package index. requirements-nodeps.txt
# holds the packages whose declared dependencies would replace the pinned torch (it says which).
$(STAMP): requirements-dev.txt requirements-nodeps.txt $(addsuffix /pyproject.toml,$(PACKAGES))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps $(addprefix -e ./,$(PACKAGES))
	touch $(STAMP)

# Debian packages the tests need, installed when the machine lacks them: redis-server (tests start their
# own on a free port) and libb64-0d (tritonclient's perf_analyzer binary links against it).
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	/sbin/ldconfig -p | grep -q 'libb64\.so\.0d' || missing="$$missing libb64-0d"; \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi

$(LINT_STAMP): requirements-lint.txt
	test -x $(LINT_VENV)/bin/python || python3 -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/python -m pip install -q --upgrade pip
	$(LINT_VENV)/bin/python -m pip install -q -r requirements-lint.txt
	touch $(LINT_STAMP)

demo: venv
	$(VENV)/bin/nrctl quickstart

# The Kubernetes overlays are rendered by the test suite's own kustomize subset (no kubectl needed) and
# checkov reads the rendered objects, with the Dockerfile.
lint: venv $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	cd proto && ../$(VENV)/bin/buf lint
	$(VENV)/bin/hadolint Dockerfile
	rm -rf $(K8S_RENDERED)
	for overlay in deploy/k8s/overlays/*/; do \
	  $(PY) tests/support/kustomize.py $$overlay $(K8S_RENDERED)/$$(basename $$overlay).yaml || exit 1; \
	done
	$(LINT_VENV)/bin/checkov --quiet --compact --skip-download --framework kubernetes dockerfile \
	  -f $(K8S_RENDERED)/*.yaml Dockerfile

test: venv system-packages lint
	$(PY) -m pytest -q tests

# Regenerate the committed gRPC stubs after editing a .proto.
proto: venv
	$(PY) proto/generate.py

clean:
	rm -rf $(VENV) $(LINT_VENV) $(K8S_RENDERED) .pytest_cache
