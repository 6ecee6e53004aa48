"""Running a service as a process: SIGINT and SIGTERM cancel its task group, so its `finally` blocks clean up.

Every service's `__main__` calls `run_service`; nothing else installs signal handlers.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import anyio


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("AUBE_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


async def _until_signal(serve: Callable[..., Awaitable[None]], settings: Any) -> None:
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    logging.getLogger(__name__).info("%s: shutting down", signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        await serve(settings)
        tg.cancel_scope.cancel()


def run_service(serve: Callable[..., Awaitable[None]], settings: Any) -> None:
    """Run `serve(settings)` until it returns or a signal arrives; uvloop where installed."""
    try:
        import uvloop  # noqa: F401

        options = {"use_uvloop": True}
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        options = {}
    anyio.run(_until_signal, serve, settings, backend_options=options)
