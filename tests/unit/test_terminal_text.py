"""A hostile function's text must not drive the terminal of whoever reads it with `aube connect` or `aube logs`
(red-team finding: OSC 52 clipboard writes, screen redraws, terminal query answers typed into connect's stdin)."""

from __future__ import annotations

from aube.cli.connect import close_text, message_text, refusal_text
from aube.cli.logs import format_line
from aube.cli.terminal import printable
from aube.shared.schemas import LogLine

OSC52 = "\x1b]52;c;ZXZpbA==\x07"  # write "evil" to the clipboard
QUERY = "\x1b[6n"  # the terminal answers on stdin
REDRAW = "\r\x1b[2K"  # erase the line just printed
RTL = "\u202e"


def _no_control(text: str) -> None:
    assert not any((ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) <= 0x9F or c == RTL for c in text), text


def test_escapes_and_queries_are_printed_escaped() -> None:
    for attack in (OSC52, QUERY, REDRAW, RTL + "gpj.exe", "\x9b6n"):
        _no_control(printable(attack))
    assert printable(OSC52) == "\\x1b]52;c;ZXZpbA==\\x07"
    assert printable("tab\tand\nnewline, ünïcode ✓") == "tab\tand\nnewline, ünïcode ✓"


def test_connect_prints_messages_close_reasons_and_refusals_escaped() -> None:
    _no_control(message_text("hi" + OSC52))
    _no_control(close_text(1000, QUERY))
    _no_control(refusal_text(400, "Bad" + REDRAW, (OSC52 + "body").encode(), retry_after=QUERY))
    assert message_text(b"\x1b[6n") == "(binary) 1b5b366e"  # binary was always hex


def test_logs_lines_are_printed_escaped() -> None:
    line = LogLine(function="f", instance="i" + QUERY, stream="stdout", line="fake" + REDRAW + OSC52, at=0.0)
    _no_control(format_line(line))
