"""`python -m aube.reaper`: the idle reaper, configured by AUBE_* environment variables; SIGINT/SIGTERM stop it."""

from __future__ import annotations

from aube.reaper.service import serve
from aube.shared.lifecycle import configure_logging, run_service
from aube.shared.settings import ReaperSettings, settings_from_env

if __name__ == "__main__":
    configure_logging()
    run_service(serve, settings_from_env(ReaperSettings))
