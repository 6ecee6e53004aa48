#!/usr/bin/env bash
# Delete a function: scripts/delete.sh <name>. NATS: $AUBE_NATS_URL (default nats://127.0.0.1:4222).
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 <name>" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
exec "${AUBE_PYTHON:-$root/.venv/bin/python}" -m aube.cli delete "$1"
