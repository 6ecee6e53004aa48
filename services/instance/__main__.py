"""`python -m aube.instance`: the server inside every function instance (a container or a child process).

It serves ONE WebSocket stream at a time on AUBE_INSTANCE_HOST:AUBE_INSTANCE_PORT (default 0.0.0.0:8080), or on
the Unix socket AUBE_INSTANCE_SOCKET when set (a sandbox with no network),
plus `GET /_aube/health` -> 200 `{"status": "ok", "busy": bool, "streams_served": int, "instance": id}`,
answered even while a stream is open (`streams_served` counts streams whose handler started). A second
concurrent upgrade gets HTTP 503 with `Retry-After`. Any request path and query string is accepted for the
upgrade: the proxy forwards the client's own handshake (`/<name>?a=b`).

The function folder is AUBE_FN_DIR (default: the current directory). With AUBE_FN_RUNTIME=python (default)
its `fn.py` is imported (the folder first on sys.path, so it can import sibling modules) and `fn` runs in one
of three styles, told apart automatically:
- `def fn(websocket)`: a `websockets.sync` server connection; served by `websockets.sync.server` (threads).
- `async def fn(websocket)`: a `websockets.asyncio` server connection.
- `async def fn(messages)` with `yield`: an async iterator of incoming messages in; every value yielded goes
  out; returning closes the stream normally (1000).
A handler that raises closes its stream with 1011 and "ExceptionType: message" as reason (cut to 123 bytes);
the instance then serves the next stream.

Subprotocols: if fn.py sets `subprotocols = ["b", "a"]` at module level they are negotiated as a websockets
server given that list does (the first of the function's list that the client offers; a client offering none
of them, or none at all, gets HTTP 400). Without it the instance accepts whatever the client offers first.

With AUBE_FN_RUNTIME=command, AUBE_FN_COMMAND (a JSON argv list) is started for each stream, websocketd-style,
in the function folder: AUBE_FN_MODE=lines maps each text message to a stdin line and each stdout line to a
text message; AUBE_FN_MODE=binary passes raw bytes both ways. Exit status 0 closes with 1000, anything else
with 1011; a client that leaves gets the process terminated (SIGTERM, then SIGKILL after AUBE_COMMAND_GRACE
seconds, default 2).

SIGTERM/SIGINT: stop accepting, close an open stream with 1001, exit 0; a function that does not return
by then gets AUBE_SHUTDOWN_GRACE seconds (default 5) before the process exits anyway (still with 0).
Each stream logs one line on stdout when it ends: duration, messages in/out, close code.

Only the standard library and websockets are imported: the function image carries nothing else, and runs
with a read-only root file system (no bytecode is written).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import sys

sys.dont_write_bytecode = True

from websockets.asyncio.server import ServerConnection  # noqa: E402

from aube.instance import command, handlers, server, shutdown  # noqa: E402 - after dont_write_bytecode on purpose
from aube.instance.config import ConfigError, InstanceConfig  # noqa: E402

logger = logging.getLogger("aube.instance")


def _setup_logging() -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # websockets logs every opened and rejected connection at INFO; our per-stream line says it all.
    logging.getLogger("websockets").setLevel(logging.WARNING)


def main() -> int:
    _setup_logging()
    try:
        config = InstanceConfig.from_env()
    except ConfigError as e:
        logger.error("bad configuration: %s", e)  # noqa: TRY400 - no traceback for bad input
        return 2
    stopper = shutdown.Stopper(config.shutdown_grace)
    if config.runtime == "command":
        stopper.install()
        after = command.reap_orphans if os.getpid() == 1 else None
        run_command = functools.partial(
            command.run_command,
            argv=config.command,
            cwd=config.fn_dir,
            mode=config.mode,
            grace=config.command_grace,
        )
        try:
            asyncio.run(server.serve_async(config, run_command, server.Negotiation(None), stopper, after))
        finally:
            # asyncio.run cancels what is left, a command's shielded stop included: nothing may outlive us.
            command.kill_all()
        return 0

    try:
        loaded = handlers.load_function(config.fn_dir)
    except handlers.LoadError as e:
        logger.error("cannot load the function: %s", e)  # noqa: TRY400 - the cause is in the message
        return 1
    negotiation = server.Negotiation(loaded.subprotocols)
    stopper.install()
    if loaded.style == "sync":
        server.serve_sync(config, loaded.fn, negotiation, stopper)
    else:
        runner = handlers.run_async if loaded.style == "async" else handlers.run_generator

        async def run(connection: ServerConnection) -> None:
            await runner(loaded.fn, connection)

        asyncio.run(server.serve_async(config, run, negotiation, stopper))
    return 0


if __name__ == "__main__":
    sys.exit(main())
