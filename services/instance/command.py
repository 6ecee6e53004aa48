"""The `command` runtime: one process per stream, websocketd-style.

Lines mode: each incoming message is one line on the process's stdin; each line it prints (without its line
ending) is one text message. Binary mode: raw bytes both ways; each read from stdout becomes one binary
message. The process runs in its own session (process group) with cwd = the function folder, so everything it
starts can be signalled together. When it exits the stream closes (1000 on status 0, 1011 otherwise); when the
client leaves first it gets SIGTERM, then SIGKILL after a grace period, and is always reaped.

Only the standard library and websockets here: this module ships into every function image.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path
from typing import Literal

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

logger = logging.getLogger(__name__)

READ_CHUNK = 65536
# A line longer than this is sent in pieces rather than buffered without bound (websockets' default max_size).
MAX_LINE = 2**20
# Output the process wrote just before it exited still goes out, unless a descendant holds stdout open.
DRAIN_AFTER_EXIT = 1.0

# Process groups of running commands, for a last-resort kill when the instance must exit without waiting.
live_groups: set[int] = set()


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"command killed by {name}"
    return f"command exited with status {returncode}"


def split_lines(buffer: bytearray) -> list[bytes]:
    """Take the complete lines (without "\\n" or "\\r\\n") out of `buffer`; an overlong rest goes out too."""
    lines: list[bytes] = []
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            break
        line = bytes(buffer[:end])
        del buffer[: end + 1]
        lines.append(line[:-1] if line.endswith(b"\r") else line)
    if len(buffer) >= MAX_LINE:
        lines.append(bytes(buffer))
        buffer.clear()
    return lines


async def _pump_in(connection: ServerConnection, stdin: asyncio.StreamWriter, binary: bool) -> None:
    """Client to stdin until the client leaves; a process that stopped reading just loses its input."""
    writable = True
    try:
        async for message in connection:
            if not writable:
                continue
            data = message.encode() if isinstance(message, str) else bytes(message)
            if not binary:
                data += b"\n"
            try:
                stdin.write(data)
                await stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                writable = False
    except ConnectionClosed:
        pass


async def _pump_out(connection: ServerConnection, stdout: asyncio.StreamReader, binary: bool) -> None:
    buffer = bytearray()
    try:
        while chunk := await stdout.read(READ_CHUNK):
            if binary:
                await connection.send(chunk)
                continue
            buffer += chunk
            for line in split_lines(buffer):
                await connection.send(line.decode("utf-8", errors="replace"))
        if buffer and not binary:
            await connection.send(bytes(buffer).decode("utf-8", errors="replace"))
    except ConnectionClosed:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _stop(process: asyncio.subprocess.Process, grace: float) -> None:
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    if process.returncode is None:
        _signal_group(pgid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            logger.info("command pid=%d ignored SIGTERM for %.1fs; killing it", pgid, grace)
    # Whatever of the group is left (the leader, or descendants of a leader that exited) goes now.
    _signal_group(pgid, signal.SIGKILL)
    await process.wait()


async def run_command(
    connection: ServerConnection,
    argv: list[str],
    cwd: Path,
    mode: Literal["lines", "binary"],
    grace: float,
) -> tuple[int, str] | None:
    """Carry one stream; return the close code and reason when the process ended it, None if the client did."""
    binary = mode == "binary"
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as e:
        raise RuntimeError(f"cannot start command {argv[0]!r}: {e.strerror or e}") from e
    assert process.stdin is not None
    assert process.stdout is not None
    live_groups.add(process.pid)
    pump_in = asyncio.create_task(_pump_in(connection, process.stdin, binary))
    pump_out = asyncio.create_task(_pump_out(connection, process.stdout, binary))
    exited = asyncio.create_task(process.wait())
    try:
        done, _ = await asyncio.wait({pump_in, exited}, return_when=asyncio.FIRST_COMPLETED)
        if exited not in done:
            pump_in.result()
            return None
        await asyncio.wait({pump_out}, timeout=DRAIN_AFTER_EXIT)
        returncode = exited.result()
        if returncode == 0:
            return 1000, ""
        return 1011, exit_reason(returncode)
    finally:
        for task in (pump_in, pump_out, exited):
            task.cancel()
        # Shielded: a cancelled stream (server shutdown) must still leave no process behind.
        await asyncio.shield(_stop(process, grace))
        live_groups.discard(process.pid)
        await asyncio.gather(pump_in, pump_out, exited, return_exceptions=True)
        with contextlib.suppress(Exception):
            process.stdin.close()


def kill_all() -> None:
    """Last resort before the instance exits without waiting: no command outlives it."""
    for pgid in list(live_groups):
        _signal_group(pgid, signal.SIGKILL)


def reap_orphans() -> int:
    """Reap zombies re-parented to us; only needed when we are PID 1 of a container without an init.

    A command's descendants killed with its group become our children once their parent is gone. asyncio's
    child watcher waits only for the pids it started, so they would stay zombies. Call this only between
    streams, when no command of ours is running, so no pid asyncio still waits for can be taken from it.
    """
    me = os.getpid()
    reaped = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 0
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields we need follow the last ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) < 2 or fields[0] != b"Z" or int(fields[1]) != me:
            continue
        with contextlib.suppress(ChildProcessError):
            os.waitpid(int(entry), os.WNOHANG)
            reaped += 1
    return reaped
