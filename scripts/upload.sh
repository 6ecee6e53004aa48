#!/usr/bin/env bash
# Upload a function folder, as AubeFaaS's upload script did: scripts/upload.sh <folder> <name>
# Prints the stream URL (ws://.../<name>) on success; a clear error and a non-zero exit otherwise.
# NATS: $AUBE_NATS_URL (default nats://127.0.0.1:4222), credentials from $AUBE_CREDENTIALS.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 <folder> <name>" >&2
  exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
# The deployer's NATS password, created by `make start` (aube start) in the repo's data folder.
# (A file named in AUBE_CREDENTIALS must exist; without one, a server without accounts is used as it is.)
if [ -z "${AUBE_CREDENTIALS:-}" ] && [ -f "$root/.data/credentials.env" ]; then
  export AUBE_CREDENTIALS="$root/.data/credentials.env"
fi
exec "${AUBE_PYTHON:-$root/.venv/bin/python}" -m aube.cli deploy --quiet "$1" "$2"
