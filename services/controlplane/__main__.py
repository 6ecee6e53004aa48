"""`python -m aube.controlplane`: the control plane, configured by AUBE_* environment variables."""

from __future__ import annotations

import logging
import os

import anyio

from aube.controlplane.service import serve
from aube.shared.settings import ControlPlaneSettings, settings_from_env


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("AUBE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = settings_from_env(ControlPlaneSettings)
    try:
        anyio.run(serve, settings, backend_options={"use_uvloop": True})
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
