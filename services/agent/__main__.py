"""`python -m aube.agent`: one host's agent, configured by AUBE_* environment variables; SIGINT/SIGTERM stop it.

Its own settings are `AgentSettings` (host id, capacity, lease); the runtime it runs reads the control plane's
(`AUBE_RUNTIME`, `AUBE_DATA_DIR`, `AUBE_PUBLISH_HOST`, `AUBE_ADVERTISE_HOST`, `AUBE_OWNER`, ...).
"""

from __future__ import annotations

from functools import partial

from aube.agent.service import serve
from aube.shared.lifecycle import configure_logging, run_service
from aube.shared.settings import AgentSettings, ControlPlaneSettings, settings_from_env

if __name__ == "__main__":
    configure_logging()
    runtime_settings = settings_from_env(ControlPlaneSettings)
    run_service(partial(serve, runtime_settings=runtime_settings), settings_from_env(AgentSettings))
