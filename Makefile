# Aube: `make start` runs the whole platform in the foreground (Ctrl-C stops it); `make test` runs the tests.
PROXIES ?= 1

.PHONY: start test test-fast lint setup bench clean

setup:
	@scripts/setup.sh

start: setup
	.venv/bin/aube start --proxies $(PROXIES)

test: setup
	.venv/bin/pytest

test-fast: setup
	.venv/bin/pytest tests/unit

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	scripts/typecheck.sh

clean:
	rm -rf .data .typecheck .mypy_cache .pytest_cache
