#!/usr/bin/env bash
# mypy --strict over the installed names. The card's folders (shared/, services/<name>/, cli/) become `aube.*`
# only when installed, and mypy cannot follow setuptools' editable import hook, so this lays a view of
# symlinks named as installed (.typecheck/aube/...) and checks that, and the test rig's `rig` (scripts/rig).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
view=.typecheck/aube
rm -rf .typecheck && mkdir -p "$view"
ln -s ../../shared "$view/shared"
ln -s ../../cli "$view/cli"
for svc in services/*/; do
  svc=${svc%/}
  ln -s "../../$svc" "$view/${svc#services/}"
done
export MYPYPATH=.typecheck:scripts
exec "$PY" -m mypy --strict --explicit-package-bases --namespace-packages \
  --config-file pyproject.toml "$view" scripts/rig "$@"
