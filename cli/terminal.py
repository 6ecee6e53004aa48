"""Text from a function (its messages, close reasons, refusal bodies, output lines) made safe to print on a terminal.

A hostile function's text printed raw drives the user's terminal: OSC 52 writes (or queries) the clipboard, CSI
sequences and a carriage return redraw the screen (a forged line looks like a real one), and a terminal's answer to a
query (`ESC[6n`) is typed into `aube connect`'s stdin and sent to the function. So every control character but tab
and newline, DEL, the C1 controls and the bidirectional overrides are printed escaped (`\\x1b`, `\\u202e`); the
`--json` outputs are JSON and need nothing."""

from __future__ import annotations

import re

# C0 but tab and newline, DEL, C1; the bidi embeddings, overrides and isolates (text that reads other than it is).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` with what could drive a terminal escaped; everything else as it is."""
    return _UNSAFE.sub(_escape, text)
