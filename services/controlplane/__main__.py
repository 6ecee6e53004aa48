"""`python -m aube.controlplane`: the control plane, configured by AUBE_* environment variables."""

from __future__ import annotations

from aube.controlplane.service import serve
from aube.shared.lifecycle import configure_logging, run_service
from aube.shared.settings import ControlPlaneSettings, settings_from_env

if __name__ == "__main__":
    configure_logging()
    run_service(serve, settings_from_env(ControlPlaneSettings))
