#!/usr/bin/env bash
# Build the docker runtime's images on this host: aube-base:bookworm (mmdebstrap, Debian packages; skipped when
# it exists) and aube-runtime:<digest> (the in-instance server on top). No registry is needed.
# Settings come from AUBE_* variables, as for the control plane (AUBE_BASE_IMAGE, AUBE_BUILD_TIMEOUT, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m aube.controlplane.runtimes.images "$@"
