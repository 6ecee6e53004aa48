"""Instance addresses as the registry stores them, and how a platform service connects to one.

Two forms:
    host:port / [v6]:port     TCP (Docker instances, unsandboxed process instances)
    unix:/absolute/path       a Unix socket on the platform's host (sandboxed process instances, which have no
                              network the host can reach)

A unix address is a host path: it must never reach a deployer. `public` is what replies and events carry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.abc
import msgspec

UNIX_PREFIX = "unix:"
# An instance that takes handed-off client sockets (aube.instance.handoff) listens for them on this Unix socket,
# beside its own socket in the folder only the platform and the instance reach.
HANDOFF_SOCKET_NAME = "handoff.sock"


class TcpAddress(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int


class UnixAddress(msgspec.Struct, frozen=True, kw_only=True):
    path: str


Address = TcpAddress | UnixAddress


def parse(address: str) -> Address:
    """The address's parts; ValueError for anything that is neither form."""
    if address.startswith(UNIX_PREFIX):
        path = address[len(UNIX_PREFIX) :]
        if not path.startswith("/") or "\0" in path:
            raise ValueError(f"a unix address needs an absolute path: {address!r}")
        return UnixAddress(path=path)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port address: {address!r}")
    return TcpAddress(host=host.strip("[]"), port=int(port))


def unix(path: str) -> str:
    return f"{UNIX_PREFIX}{path}"


def handoff_path(address: str) -> str | None:
    """Where the instance at `address` would take handed-off sockets: beside its Unix socket; None for TCP."""
    if not address.startswith(UNIX_PREFIX):
        return None
    folder = address[len(UNIX_PREFIX) :].rpartition("/")[0]
    return f"{folder}/{HANDOFF_SOCKET_NAME}" if folder else None


def public(address: str) -> str:
    """The address as a reply may show it: a Unix socket's host path is replaced by 'unix' alone."""
    return "unix" if address.startswith(UNIX_PREFIX) else address


P = TypeVar("P", bound=asyncio.BaseProtocol)


async def create_connection(protocol_factory: Callable[[], P], address: str) -> tuple[asyncio.BaseTransport, P]:
    """`loop.create_connection` or `loop.create_unix_connection`, as the address says (asyncio protocols)."""
    target = parse(address)
    loop = asyncio.get_running_loop()
    if isinstance(target, UnixAddress):
        return await loop.create_unix_connection(protocol_factory, target.path)
    return await loop.create_connection(protocol_factory, target.host, target.port)


async def open_streams(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio's reader and writer on a new connection to the address: cheaper than `connect_stream` where a
    connection is made per request on a hot path (`instance_health.read`)."""
    target = parse(address)
    if isinstance(target, UnixAddress):
        return await asyncio.open_unix_connection(target.path)
    return await asyncio.open_connection(target.host, target.port)


async def connect_stream(address: str) -> anyio.abc.SocketStream | anyio.abc.UNIXSocketStream:
    """An anyio byte stream to the address."""
    target = parse(address)
    if isinstance(target, UnixAddress):
        return await anyio.connect_unix(target.path)
    return await anyio.connect_tcp(target.host, target.port)
