# Aube: `make start` runs the whole platform in the foreground (Ctrl-C stops it); `make test` runs the tests.
PROXIES ?= 1

.PHONY: start test test-fast lint setup bench bench-smoke clean cluster cluster-down cluster-status test-cluster

setup:
	@scripts/setup.sh

start: setup
	.venv/bin/aube start --proxies $(PROXIES)

# Every suite: the main one, then the cluster rig's (brought up from nothing and removed after, about 5 minutes).
test: setup
	.venv/bin/pytest
	.venv/bin/pytest -m cluster tests/cluster

test-fast: setup
	.venv/bin/pytest tests/unit tests/controlplane

# The test rig on one machine (scripts/cluster.sh): three NATS nodes, three Docker-in-Docker hosts, the plane.
cluster:
	scripts/cluster.sh up

cluster-down:
	scripts/cluster.sh down

cluster-status:
	scripts/cluster.sh status

# The rig's suite alone: brings the rig up (or reuses it; one it started is taken down after).
test-cluster: setup
	.venv/bin/pytest -m cluster tests/cluster

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
