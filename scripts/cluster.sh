#!/usr/bin/env bash
# The test rig on one machine (issue 10; scripts/rig/__main__.py says what each command does):
#   scripts/cluster.sh up       three NATS nodes (127.0.0.1:4222-4224), three Docker-in-Docker hosts each with a
#                               proxy (127.0.0.1:8093-8095) and agent, the control plane and reaper; images built here
#   scripts/cluster.sh status   containers, NATS cluster and JetStream, services, inner engines, proxies
#   scripts/cluster.sh down     remove every container, volume and the network of the rig, and .data/cluster
# The deployer's credentials: AUBE_CREDENTIALS=.data/cluster/credentials.env (it also sets AUBE_NATS_URL when
# sourced: `set -a; . .data/cluster/credentials.env; set +a`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = up ]; then
  # The virtualenv (its Python renders the NATS configuration; its packages' versions go into the host image) and
  # the Debian tools the images need (aube-base:bookworm, for the inner engines, the rig builds itself).
  AUBE_SKIP_IMAGES=1 scripts/setup.sh
fi
PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-.venv/bin/python}" -m rig "$@"
