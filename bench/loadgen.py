"""A lean raw-frame WebSocket client for the benchmarks, run as its own process (so its CPU is its own).

It opens each stream with a minimal HTTP/1.1 upgrade over a plain socket (no extensions offered, so no
compression anywhere), then sends one pre-built masked binary frame per round trip and parses the echoed frame
minimally. Only completed round trips are counted: a frame counts when its whole payload has come back.

Modes (all print one JSON object on stdout):
  rt      N concurrent streams, closed loop (send, wait for the echo, send again) for a warm-up and then a measured
          window; reports round trips, latency percentiles, its own CPU and the CPU of watched processes.
  setup   sequential stream setups: connect, upgrade, first echo (the timed part), then a clean close.
  setups  stream setups per second: P threads each looping connect, upgrade, echo, close for a fixed time.
  burst   N clients connect at once, each waits for its first echo and holds its stream until all are served.

Watched processes (`--watch label=pid`, `--watch-tree label=pid` to add the pid's children, as nginx workers):
their utime+stime from /proc/<pid>/stat is read at the start and the end of the measured window.

Instances answer the platform only (docs/security.md, "Instance credential"): for the direct baseline the bench
hands the instance credentials over in the environment, AUBE_BENCH_CREDENTIALS = {"host:port": secret} (not on the
command line, where any local user could read them), and each upgrade to such an address presents its secret.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import selectors
import socket
import struct
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA


class Refused(Exception):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status: int) -> None:
        super().__init__(f"upgrade refused with HTTP {status}")
        self.status = status


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str
    unix: str = ""  # a Unix socket path instead of host:port (a sandboxed process instance)

    @classmethod
    def parse(cls, text: str) -> Target:
        """`host:port/path`."""
        hostport, _, path = text.partition("/")
        host, _, port = hostport.rpartition(":")
        return cls(host, int(port), "/" + path)


def client_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One masked, final frame (RFC 6455 5.2). Built once per run, so masking cost is not in the loop."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if n == 0:
        return head + mask
    full_mask = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(full_mask, "big")).to_bytes(n, "big")
    return head + mask + masked


CLOSE = client_frame(struct.pack("!H", 1000), OP_CLOSE)
CREDENTIAL_HEADER = "X-Aube-Instance-Secret"  # aube.shared.names.HEADER_INSTANCE_SECRET; loadgen imports no aube
CREDENTIALS: dict[str, str] = json.loads(os.environ.get("AUBE_BENCH_CREDENTIALS") or "{}")


def _credential(target: Target) -> str:
    secret = CREDENTIALS.get(f"unix:{target.unix}" if target.unix else f"{target.host}:{target.port}")
    return f"{CREDENTIAL_HEADER}: {secret}\r\n" if secret else ""


def connect(target: Target, timeout: float) -> tuple[socket.socket, bytearray]:
    """Open a stream; return the socket and any bytes that arrived after the 101 head."""
    if target.unix:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(timeout)
        try:
            s.connect(target.unix)
        except BaseException:
            s.close()
            raise
    else:
        s = socket.create_connection((target.host, target.port), timeout=timeout)
    try:
        if not target.unix:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(
            (
                f"GET {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"{_credential(target)}\r\n"
            ).encode()
        )
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed during the upgrade")
            buf += chunk
        end = buf.index(b"\r\n\r\n") + 4
        status = int(bytes(buf[:end]).split(b" ", 2)[1])
        if status != 101:
            raise Refused(status)
        return s, buf[end:]
    except BaseException:
        s.close()
        raise


def next_frame(buf: bytearray) -> tuple[int, int, int] | None:
    """(opcode, payload start, frame end) of the first complete frame in `buf`, or None. Server frames are unmasked."""
    if len(buf) < 2:
        return None
    n = buf[1] & 0x7F
    start = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = int.from_bytes(buf[2:4], "big")
        start = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = int.from_bytes(buf[2:10], "big")
        start = 10
    if len(buf) < start + n:
        return None
    return buf[0] & 0x0F, start, start + n


class Stream:
    """One stream in the closed loop: counts a round trip when a whole data frame has come back."""

    def __init__(self, sock: socket.socket, buf: bytearray, frame: bytes, payload_len: int) -> None:
        self.sock = sock
        self.buf = buf
        self.frame = frame
        self.payload_len = payload_len
        self.sent_at = 0

    def send(self) -> None:
        self.sent_at = time.perf_counter_ns()
        self.sock.sendall(self.frame)

    def feed(self) -> int:
        """Read what is there; return how many data frames completed (0 or 1 in a closed loop)."""
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("server closed the stream")
        self.buf += chunk
        done = 0
        while (found := next_frame(self.buf)) is not None:
            opcode, start, end = found
            if opcode == OP_PING:
                # The pong must echo the ping's payload: websockets' keepalive matches them and closes a stream
                # whose pings go unanswered (after 20 s by default), which would end a long run.
                self.sock.sendall(client_frame(bytes(self.buf[start:end]), OP_PONG))
            elif opcode == OP_CLOSE:
                raise ConnectionError("server sent close")
            elif opcode == OP_BINARY:
                if end - start != self.payload_len:
                    raise ValueError(f"echo of {end - start} bytes, expected {self.payload_len}")
                done += 1
            del self.buf[:end]
        return done

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(CLOSE)
        self.sock.close()


def proc_ticks(pid: int, tree: bool) -> int:
    """utime+stime of `pid` (and of its children when `tree`) in clock ticks."""
    pids = [pid]
    if tree:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except OSError:
            pass
    return total


@dataclass
class Watch:
    entries: list[tuple[str, int, bool]] = field(default_factory=list)

    def read(self) -> dict[str, int]:
        return {label: proc_ticks(pid, tree) for label, pid, tree in self.entries}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[i])


def run_rt(
    targets: list[Target], size: int, warmup: float, duration: float, watch: Watch, max_rts: int
) -> dict[str, object]:
    payload = os.urandom(size)
    frame = client_frame(payload)
    streams: list[Stream] = []
    sel = selectors.DefaultSelector()
    try:
        for t in targets:
            sock, buf = connect(t, 30)
            streams.append(Stream(sock, buf, frame, size))
        # First round trip on each stream checks the payload itself; later ones check the length only.
        for s in streams:
            s.sock.settimeout(30)
            s.sock.sendall(frame)
            while next_frame(s.buf) is None:
                s.buf += s.sock.recv(1 << 20)
            _, start, end = next_frame(s.buf)  # type: ignore[misc]
            if bytes(s.buf[start:end]) != payload:
                raise ValueError("echo differs from what was sent")
            del s.buf[:end]
        for s in streams:
            sel.register(s.sock, selectors.EVENT_READ, s)
            s.send()
        measuring = False
        latencies: list[int] = []
        rts = 0
        now = time.monotonic()
        warm_end = now + warmup
        end = warm_end + duration
        t_start = cpu_start = 0.0
        w_start: dict[str, int] = {}
        while True:
            now = time.monotonic()
            if not measuring and now >= warm_end:
                measuring = True
                w_start = watch.read()
                tm = os.times()
                cpu_start = tm.user + tm.system
                t_start = time.monotonic()
            if measuring and (now >= end or rts >= max_rts):
                break
            for key, _ in sel.select(timeout=1.0):
                s = key.data
                if s.feed():
                    if measuring:
                        latencies.append(time.perf_counter_ns() - s.sent_at)
                        rts += 1
                    s.send()
        elapsed = time.monotonic() - t_start
        w_end = watch.read()
        tm = os.times()
        cpu = tm.user + tm.system - cpu_start
    finally:
        sel.close()
        for s in streams:
            s.close()
    latencies.sort()
    return {
        "mode": "rt",
        "streams": len(targets),
        "size": size,
        "round_trips": rts,
        "elapsed": elapsed,
        "rt_per_s": rts / elapsed if elapsed > 0 else 0.0,
        "p50_us": percentile(latencies, 0.50) / 1000,
        "p99_us": percentile(latencies, 0.99) / 1000,
        "loadgen_cpu_s": cpu,
        "watched_cpu_s": {k: (w_end[k] - w_start[k]) / CLK_TCK for k in w_end},
    }


def one_setup(target: Target, payload_frame: bytes, timeout: float) -> float:
    """Seconds from connect to the first echo; the stream is then closed cleanly (not timed)."""
    t0 = time.perf_counter()
    sock, buf = connect(target, timeout)
    stream = Stream(sock, buf, payload_frame, 64)
    try:
        stream.send()
        while not stream.feed():
            pass
        elapsed = time.perf_counter() - t0
        sock.sendall(CLOSE)
        # Wait for the server's close frame (or EOF), so that the next setup finds the instance free.
        while True:
            chunk = sock.recv(65536)
            if not chunk or chunk[0] & 0x0F == OP_CLOSE:
                break
        return elapsed
    finally:
        sock.close()


def run_setup(targets: list[Target], count: int) -> dict[str, object]:
    frame = client_frame(os.urandom(64))
    samples = [one_setup(targets[i % len(targets)], frame, 30) for i in range(count)]
    ordered = sorted(samples)
    return {
        "mode": "setup",
        "count": count,
        "p50_ms": percentile(ordered, 0.5) * 1000,
        "p95_ms": percentile(ordered, 0.95) * 1000,
        "p99_ms": percentile(ordered, 0.99) * 1000,
        "samples_ms": [s * 1000 for s in samples],
    }


def run_setups(target: Target, parallel: int, duration: float, watch: Watch) -> dict[str, object]:
    frame = client_frame(os.urandom(64))
    done = [0] * parallel
    errors: list[str] = []
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            try:
                one_setup(target, frame, 30)
            except Exception as e:  # counted, not fatal: the rate is of completed setups only
                errors.append(repr(e))
                return
            if not stop.is_set():
                done[i] += 1

    w_start = watch.read()
    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(parallel)]
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    elapsed = time.monotonic() - t0
    w_end = watch.read()
    for t in threads:
        t.join(60)
    total = sum(done)
    return {
        "mode": "setups",
        "parallel": parallel,
        "setups": total,
        "elapsed": elapsed,
        "setups_per_s": total / elapsed,
        "errors": errors,
        "watched_cpu_s": {k: (w_end[k] - w_start[k]) / CLK_TCK for k in w_end},
    }


def run_burst(target: Target, clients: int, timeout: float) -> dict[str, object]:
    frame = client_frame(os.urandom(64))
    served_at: list[float] = []
    rejected: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    all_done = threading.Event()
    go = threading.Barrier(clients)
    t0 = 0.0

    def finished() -> None:
        if len(served_at) + len(rejected) + len(errors) == clients:
            all_done.set()

    def client() -> None:
        nonlocal t0
        try:
            if go.wait() == 0:
                t0 = time.perf_counter()
            sock, buf = connect(target, timeout)
        except Refused as e:
            with lock:
                rejected.append(e.status)
                finished()
            return
        except Exception as e:
            with lock:
                errors.append(repr(e))
                finished()
            return
        stream = Stream(sock, buf, frame, 64)
        try:
            stream.send()
            while not stream.feed():
                pass
            with lock:
                served_at.append(time.perf_counter())
                finished()
            # Hold the stream until every client is served, so that no instance is reused within the burst.
            all_done.wait(timeout)
        except Exception as e:
            with lock:
                errors.append(repr(e))
                finished()
        finally:
            stream.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
    return {
        "mode": "burst",
        "clients": clients,
        "served": len(served_at),
        "rejected": len(rejected),
        "rejected_statuses": rejected,
        "errors": errors,
        "all_served_s": (max(served_at) - t0) if served_at else float("nan"),
        "first_served_s": (min(served_at) - t0) if served_at else float("nan"),
    }


def _watch(args: argparse.Namespace) -> Watch:
    w = Watch()
    for spec, tree in [(s, False) for s in args.watch] + [(s, True) for s in args.watch_tree]:
        label, _, pid = spec.partition("=")
        w.entries.append((label, int(pid), tree))
    return w


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["rt", "setup", "setups", "burst"])
    p.add_argument("targets", nargs="+", help="host:port/path, one per stream (rt) or rotated (setup)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--max-rts", type=int, default=10_000_000)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--watch", action="append", default=[], metavar="LABEL=PID")
    p.add_argument("--watch-tree", action="append", default=[], metavar="LABEL=PID")
    args = p.parse_args(argv)
    targets = [Target.parse(t) for t in args.targets]
    result: dict[str, object]
    if args.mode == "rt":
        result = run_rt(targets, args.size, args.warmup, args.duration, _watch(args), args.max_rts)
    elif args.mode == "setup":
        result = run_setup(targets, args.count)
    elif args.mode == "setups":
        result = run_setups(targets[0], args.parallel, args.duration, _watch(args))
    else:
        result = run_burst(targets[0], args.clients, args.timeout)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
