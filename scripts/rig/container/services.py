"""The services of one rig container, run and restarted by Aube's own supervisor (`aube.cli.supervisor`, as
`make start` does) until the container stops. Runs inside the container, with the host image's Python:

    python services.py /etc/aube-rig/services.json

The file (written by the rig, scripts/rig/layout.py says what is in it) lists each service's module and
environment; `{address}` and `{name}` in a value become the container's address on the rig network and its name.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from aube.cli.supervisor import Service, Supervisor

WORKDIR = Path("/var/lib/aube")


def fill(value: str, fields: dict[str, str]) -> str:
    for key, replacement in fields.items():
        value = value.replace("{" + key + "}", replacement)
    return value


def constant(env: dict[str, str]) -> Callable[[int], dict[str, str]]:
    return lambda _generation: env


def main(spec_file: str) -> None:
    spec = json.loads(Path(spec_file).read_text())
    name = socket.gethostname()  # the rig starts each container with its name as host name
    fields = {"address": socket.gethostbyname(name), "name": name}
    WORKDIR.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor(WORKDIR, dict(os.environ), lambda line: print(f"[{name}] {line}", flush=True))
    supervisor.install_signal_handlers()
    try:
        for service in spec["services"]:
            env = {key: fill(value, fields) for key, value in service["env"].items()}
            argv = [sys.executable, "-m", service["module"]]
            supervisor.start(Service(service["name"], argv, constant(env)))
        supervisor.run()
    finally:
        supervisor.stop_all()


if __name__ == "__main__":
    main(sys.argv[1])
