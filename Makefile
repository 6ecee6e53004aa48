# Aube: `make start` runs the whole platform in the foreground (Ctrl-C stops it); `make test` runs the tests.
PROXIES ?= 1

.PHONY: start test test-fast lint setup bench bench-smoke clean

setup:
	@scripts/setup.sh

start: setup
	.venv/bin/aube start --proxies $(PROXIES)

test: setup
	.venv/bin/pytest

test-fast: setup
	.venv/bin/pytest tests/unit tests/controlplane

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	scripts/typecheck.sh

clean:
	rm -rf .data .typecheck .mypy_cache .pytest_cache

# Benchmarks (bench/README.md): the full run writes bench/RESULTS.md and bench/results.png (several minutes);
# the smoke run is the same code with tiny counts (seconds) and asserts nothing about timings.
bench: setup
	.venv/bin/pip install -q -r bench/requirements.txt
	@command -v nginx >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q nginx-light; } || echo "no nginx: its configurations are skipped"
	.venv/bin/python bench/run.py

bench-smoke: setup
	@command -v nginx >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q nginx-light; } || echo "no nginx: its configurations are skipped"
	.venv/bin/python bench/run.py --smoke
