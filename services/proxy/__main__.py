"""`python -m aube.proxy`: one proxy replica, configured from AUBE_* environment variables."""

from __future__ import annotations

import logging
import os
import signal

import anyio

from aube.proxy.service import serve
from aube.shared.settings import ProxySettings, settings_from_env


async def _main(settings: ProxySettings) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(serve, settings)
        # SIGTERM and Ctrl-C end the replica cleanly: claims released, lease deleted.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                tg.cancel_scope.cancel()
                return


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("AUBE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    settings = settings_from_env(ProxySettings)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux-only dependency
        anyio.run(_main, settings)
    else:
        anyio.run(_main, settings, backend_options={"loop_factory": uvloop.new_event_loop})


if __name__ == "__main__":
    main()
