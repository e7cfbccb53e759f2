# Two commands on a fresh machine: `make demo` and `make test`. Both create the virtual environment
# and install the project first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vitrail-installed
DOMAIN ?= satellite
# Test processes: the suite waits on servers and subprocesses much of the time, so two workers pay off even on two cores.
TEST_WORKERS ?= 2
WORKDIR ?= vitrail-demo$(if $(filter-out satellite,$(DOMAIN)),-$(DOMAIN))

export HF_HUB_OFFLINE ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo test test-fast fixtures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The browser test drives Debian's Chromium (never a downloaded one); installed when apt can, else it skips.
	test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] \
		&& { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } \
		>/dev/null 2>&1; } || echo "note: no Chromium; the browser test will be skipped"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/vitrail demo --domain $(DOMAIN) --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not integration"

fixtures: $(STAMP)
	$(BIN)/python tests/fixtures/write_fixtures.py --check

clean:
	rm -rf vitrail-demo vitrail-demo-* .pytest_cache
