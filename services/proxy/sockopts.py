"""Socket options that let the kernel notice a dead peer on the proxy's TCP legs (client and instance).

A stream whose peer's host vanished (powered off, paused, cut off by a network) sees no FIN and no RST: without
help its socket stays open until the kernel gives up retransmitting, about 15 minutes, and an idle one forever.
Two kernel mechanisms end it within a bounded time, with no work per message in Python:

- TCP keepalive (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`): after `idle` seconds without a
  segment from the peer the kernel probes it every `interval` seconds, and resets the connection after `count`
  unanswered probes. It catches a dead peer on a quiet stream.
- `TCP_USER_TIMEOUT`: data unacknowledged for longer than this ends the connection (also the probes of a zero
  window, so a peer that stops reading while data waits is ended too). It catches a dead peer while data flows,
  and it caps keepalive as well: with both set, the kernel ends a silent peer once `user_timeout` has passed since
  it last heard from it, at the next probe.

Neither notices a peer whose process is hung but whose kernel still answers (a SIGSTOPped process, a blocked event
loop): that kernel acknowledges every segment and every probe. That case is the per-function ping policy's
(`[limits] ping_interval`, see `aube.proxy.streams`). Unix-socket legs (sandboxed process instances on this host)
get no options at all: there is no network between the ends, so there is no peer host that can vanish, and the
kernel reports a process that exits at once.

Pure apart from `apply`: `plan` turns the settings into (level, option, value) triples and checks them.
"""

from __future__ import annotations

import socket
from typing import Protocol

from aube.shared.settings import ProxySettings

# Linux values; the `socket` module lacks TCP_USER_TIMEOUT on some Python builds.
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


class _Settable(Protocol):
    """A socket, or uvloop's stand-in for a transport's socket (`get_extra_info("socket")`)."""

    @property
    def family(self) -> int: ...

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


Option = tuple[int, int, int]


def _whole_seconds(name: str, value: float) -> int:
    # The kernel takes whole seconds from 1 to 32767 for the keepalive timers.
    if not 1 <= value <= 32767:
        raise ValueError(f"AUBE_{name.upper()} must be between 1 and 32767 seconds, got {value:g}")
    return max(1, round(value))


def plan(settings: ProxySettings) -> list[Option]:
    """The options for a TCP leg, from the settings; ValueError names a setting the kernel would refuse."""
    options: list[Option] = []
    if settings.tcp_keepalive_idle is not None:
        if not 1 <= settings.tcp_keepalive_count <= 127:
            raise ValueError(f"AUBE_TCP_KEEPALIVE_COUNT must be between 1 and 127, got {settings.tcp_keepalive_count}")
        options += [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (
                socket.IPPROTO_TCP,
                socket.TCP_KEEPIDLE,
                _whole_seconds("tcp_keepalive_idle", settings.tcp_keepalive_idle),
            ),
            (
                socket.IPPROTO_TCP,
                socket.TCP_KEEPINTVL,
                _whole_seconds("tcp_keepalive_interval", settings.tcp_keepalive_interval),
            ),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, settings.tcp_keepalive_count),
        ]
    if settings.tcp_user_timeout is not None:
        if not 0 < settings.tcp_user_timeout <= 2_000_000:
            raise ValueError(
                f"AUBE_TCP_USER_TIMEOUT must be between 0 and 2000000 seconds, got {settings.tcp_user_timeout:g}"
            )
        options.append((socket.IPPROTO_TCP, TCP_USER_TIMEOUT, max(1, round(settings.tcp_user_timeout * 1000))))
    return options


def apply(sock: _Settable | None, options: list[Option]) -> None:
    """Set `options` on a TCP socket; a Unix socket (or none) is left alone."""
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    for level, option, value in options:
        sock.setsockopt(level, option, value)
