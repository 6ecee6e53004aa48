"""`aube logs [-f] [--since DURATION] <name>`: what a function's instances wrote on stdout and stderr.

The kept lines come from the control plane (`aube.fn.logs`, which also refuses a function that is not the
caller's); with -f the CLI first subscribes to `aube.logs.fn.<name>.>` in its own account, where the platform
delivers the function's lines live, then prints the kept ones and the live ones after them, leaving out a live line
the kept ones already held. docs/contract.md describes the subjects.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime

from nats.aio.client import Client as NATS

from aube.cli.terminal import printable
from aube.shared import names
from aube.shared.bus import request
from aube.shared.errors import InvalidRequest
from aube.shared.schemas import LogLine, LogsReply, LogsRequest, decode, encode

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
HISTORY_TIMEOUT = 30.0


def parse_duration(text: str) -> float:
    """Seconds of `90`, `30s`, `5m`, `1h30m`, `2d`."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise InvalidRequest(f"--since {text!r} is not a duration (e.g. 30s, 5m, 1h30m)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def format_line(line: LogLine) -> str:
    at = datetime.fromtimestamp(line.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return printable(f"{at} {line.instance} {line.stream} {line.line}")


async def show_logs(
    nc: NATS,
    name: str,
    *,
    since: float | None,
    follow: bool,
    out: Callable[[LogLine], None],
    timeout: float = HISTORY_TIMEOUT,
) -> None:
    """The kept lines of `name` since `since` (seconds since the epoch; None: all kept), then, with `follow`, every
    new line until cancelled. Raises the control plane's refusal (unknown_function for another tenant's)."""
    names.validate_name(name)
    sub = await nc.subscribe(f"{names.SUBJECT_LOGS_PREFIX}.{name}.>") if follow else None
    try:
        kept = await request(nc, names.SUBJECT_LOGS, LogsRequest(name=name, since=since), LogsReply, timeout)
        shown = {(line.instance, line.seq, line.at) for line in kept.lines}
        for line in kept.lines:
            out(line)
        if sub is None:
            return
        async for msg in sub.messages:
            try:
                line = decode(msg.data, LogLine)
            except InvalidRequest:
                continue
            if (line.instance, line.seq, line.at) not in shown:
                out(line)
    finally:
        if sub is not None:
            await sub.unsubscribe()


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lg = sub.add_parser("logs", help="show what a function's instances write on stdout and stderr")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines as they come")
    lg.add_argument("--since", help="only lines of the last DURATION (30s, 5m, 1h); default: all the platform keeps")
    lg.add_argument("--json", action="store_true", help="one JSON object per line")


async def run(nc: NATS, args: argparse.Namespace) -> None:
    since = None if args.since is None else time.time() - parse_duration(args.since)

    def out(line: LogLine) -> None:
        if args.json:
            sys.stdout.write(encode(line).decode() + "\n")
        else:
            sys.stdout.write(format_line(line) + "\n")
        sys.stdout.flush()

    await show_logs(nc, args.name, since=since, follow=args.follow, out=out, timeout=min(args.timeout, HISTORY_TIMEOUT))
