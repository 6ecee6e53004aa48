"""What one open stream costs a proxy, and what a proxy's death costs handed-off streams (bench/README.md).

- Memory per open stream: a fresh proxy replica's resident memory (VmRSS) with N streams open and echoed once,
  minus the same after one stream, divided by N - 1; relay and handoff, interleaved. The streams are the bench
  process's own sockets.
- kill -9 during handoff: open `kill_streams` streams through a proxy that hands them over, check the registry
  flags them handed off, SIGKILL the proxy, and then echo on every stream again. A stream that does not echo is cut.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import anyio
import loadgen as lg
from common import Settings, Stack, free_addresses, log, median, rotate
from harness import proc_status_kib

ECHO_FRAME = lg.client_frame(b"m" * 64)


def open_streams(port: int, count: int) -> list[lg.Stream]:
    """`count` streams through the proxy at 127.0.0.1:`port`, each echoed once (so each is set up end to end)."""
    streams: list[lg.Stream] = []
    try:
        for _ in range(count):
            sock, buf = lg.connect(lg.Target("127.0.0.1", port, "/echo"), 30)
            stream = lg.Stream(sock, buf, ECHO_FRAME, 64)
            streams.append(stream)
            echo(stream)
    except BaseException:
        close_all(streams)
        raise
    return streams


def echo(stream: lg.Stream, timeout: float = 10) -> None:
    stream.sock.settimeout(timeout)
    stream.send()
    while not stream.feed():
        pass


def close_all(streams: list[lg.Stream]) -> None:
    for stream in streams:
        stream.close()


def rss_with_streams(stack: Stack, env: dict[str, str], count: int) -> tuple[int, int]:
    """(VmRSS KiB, VmRSS KiB with `count` streams open) of a fresh proxy replica on `stack` (with `env`), the first
    after one stream opened and closed: that one's one-off allocations (code paths run once, buffers) are in both,
    and its freed memory serves the first of the `count`, so the difference is `count - 1` streams' worth. A
    fresh replica, because an older one reuses the memory of every stream it carried at once before (the data
    path's 16) and shows no growth at all."""
    port, proxy = anyio.run(functools.partial(stack.platform.start_proxy, **env))
    try:
        anyio.run(free_addresses, stack, "echo", count)
        close_all(open_streams(port, 1))
        time.sleep(0.5)  # the release (registry writes) settles
        idle = proc_status_kib(proxy.pid, "VmRSS")
        streams = open_streams(port, count)
        try:
            time.sleep(0.2)
            loaded = proc_status_kib(proxy.pid, "VmRSS")
        finally:
            close_all(streams)
    finally:
        proxy.stop()
    return idle, loaded


def memory_per_stream(s: Settings, stacks: dict[str, tuple[Stack, dict[str, str]]]) -> dict[str, Any]:
    count = max(s.streams)  # every platform keeps this many echo instances free (the data path's)
    log(f"proxy memory per open stream: {count} streams, {' and '.join(stacks)}")
    samples: dict[str, list[float]] = {label: [] for label in stacks}
    for rep in range(s.memory_reps):
        for label in rotate(list(stacks), rep):
            stack, env = stacks[label]
            idle, loaded = rss_with_streams(stack, env, count)
            samples[label].append((loaded - idle) / max(1, count - 1))
            log(f"  {label}: {idle} KiB after one stream, {loaded} KiB with {count} streams")
    return {
        "streams": count,
        "kib_per_stream": {label: median(v) for label, v in samples.items()},
        "samples_kib": samples,
    }


async def handed_off_count(stack: Stack) -> int:
    async with stack.client() as (_, registry):
        entries = await registry.instances("echo")
    return sum(1 for e in entries if e.record.handed_off)


def kill_during_handoff(s: Settings, stack: Stack) -> dict[str, Any]:
    """SIGKILL the handoff platform's proxy while `kill_streams` handed-off streams are open; count the cut ones."""
    assert stack.proxy is not None
    count = s.kill_streams
    log(f"kill -9 of a proxy with {count} handed-off streams")
    anyio.run(free_addresses, stack, "echo", count)
    streams = open_streams(stack.proxy_port, count)
    cut = 0
    errors: list[str] = []
    try:
        flagged = anyio.run(handed_off_count, stack)
        stack.proxy.kill9()
        killed_at = time.perf_counter()
        time.sleep(1.0)  # anything the proxy's death would end has ended by now
        for stream in streams:
            try:
                for _ in range(3):
                    echo(stream)
            except Exception as e:  # a cut stream: closed, reset or silent
                cut += 1
                errors.append(repr(e))
        checked_after_s = time.perf_counter() - killed_at
    finally:
        close_all(streams)
    result = {
        "streams": count,
        "handed_off": flagged,
        "cut": cut,
        "checked_after_s": checked_after_s,
        "errors": errors[:5],
    }
    log(f"  {result}")
    return result
