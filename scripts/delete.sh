#!/usr/bin/env bash
# Delete a function: scripts/delete.sh <name>. NATS: $AUBE_NATS_URL (default nats://127.0.0.1:4222),
# credentials from $AUBE_CREDENTIALS.
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 <name>" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
# The deployer's NATS password, created by `make start` (aube start) in the repo's data folder.
# (A file named in AUBE_CREDENTIALS must exist; without one, a server without accounts is used as it is.)
if [ -z "${AUBE_CREDENTIALS:-}" ] && [ -f "$root/.data/credentials.env" ]; then
  export AUBE_CREDENTIALS="$root/.data/credentials.env"
fi
exec "${AUBE_PYTHON:-$root/.venv/bin/python}" -m aube.cli delete "$1"
