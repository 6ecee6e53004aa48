"""`python -m aube.reaper`: the idle reaper with settings from AUBE_* environment variables."""

from __future__ import annotations

import contextlib
import logging
import os

import anyio

from aube.reaper.service import serve
from aube.shared.settings import ReaperSettings, settings_from_env


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("AUBE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = settings_from_env(ReaperSettings)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is the normal way to stop it
        anyio.run(serve, settings)


if __name__ == "__main__":
    main()
