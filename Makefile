# Everything the project needs is installed by these targets: Debian packages with apt-get when
# missing, Python packages into .venv from the pinned constraints.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# python3-minimal and passwd: a second local account (useradd) runs the system python in the
# isolation test, since it may not read the project interpreter
APT_PACKAGES := xrootd-server xrootd-client python3-minimal passwd

.PHONY: setup system-deps demo test lint typecheck unit down clean

setup: system-deps $(STAMP)

system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

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
	$(BIN)/pytest

clean:
	-$(BIN)/facility down
	rm -rf $(VENV) .facility
