"""The Docker CLI, as the rig uses it: every flag of `docker run` readable as it is typed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

Say = Callable[[str], None]


def run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`docker <argv>`; a failure with `check` ends the rig's command with Docker's own message."""
    result = subprocess.run(["docker", *argv], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise SystemExit(f"docker {' '.join(argv[:3])} ... failed: {result.stderr.strip()}")
    return result


def inspect(kind: str, name: str) -> dict[str, Any] | None:
    """`docker <kind> inspect <name>`, or None when there is no such object."""
    result = run([kind, "inspect", name], check=False)
    if result.returncode != 0:
        return None
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found[0] if found else None


def labelled(kind: str, label: str) -> list[str]:
    """Names (ids for volumes: their names) of the `kind` objects carrying `label`."""
    if kind == "container":
        argv = ["ps", "-a", "--filter", f"label={label}", "--format", "{{.Names}}"]
    else:
        argv = [kind, "ls", "--filter", f"label={label}", "--format", "{{.Name}}"]
    return [line for line in run(argv).stdout.splitlines() if line]


def exec_in(container: str, argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
    return run(["exec", container, *argv], check=check)
