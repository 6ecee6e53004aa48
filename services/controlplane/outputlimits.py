"""What becomes of an instance's raw output on its way to `aube logs`: lines cut from bytes, each bounded, and a
rate limit per instance whose drops are counted. Pure: no I/O; `now` is an argument.

Why here and not in the function: the function's output is read by the platform (a file or Docker's log), so a
function that floods its stdout costs the platform reading and shipping; the bound is applied before anything is
published, once per instance whichever stream the line came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TRUNCATION_MARK = " …"
# Where an OutputGate's stream is: between lines, in a line let through, in a line dropped.
_AT_START, _PASSING, _DROPPING = 0, 1, 2


@dataclass
class LineSplitter:
    """Bytes in, complete lines out (without the newline, decoded, at most `max_bytes` each).

    A line longer than `max_bytes` is cut: its first `max_bytes` are a line, and the rest up to its newline is
    skipped (counted in the cut line's `truncated`), so an endless line cannot grow the buffer."""

    max_bytes: int
    _pending: bytearray = field(default_factory=bytearray)
    _skipping: int = 0  # bytes of an over-long line skipped so far (its head is already out)
    _cut: list[tuple[str, int]] = field(default_factory=list)

    def feed(self, data: bytes) -> list[tuple[str, int]]:
        """The complete lines `data` ends, as (text, bytes truncated)."""
        out: list[tuple[str, int]] = []
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            chunk = data[start:end]
            if self._skipping:
                self._skipping += len(chunk)
            else:
                room = self.max_bytes - len(self._pending)
                self._pending += chunk[:room]
                if len(chunk) > room:
                    self._skipping = len(chunk) - room
            if newline < 0:
                break
            out.append(self._emit())
            start = newline + 1
        return out

    def flush(self) -> list[tuple[str, int]]:
        """What is left without a newline (the instance ended mid-line)."""
        if not self._pending and not self._skipping:
            return []
        return [self._emit()]

    def _emit(self) -> tuple[str, int]:
        text = bytes(self._pending).rstrip(b"\r").decode("utf-8", errors="replace")
        cut = self._skipping
        self._pending.clear()
        self._skipping = 0
        return (text + TRUNCATION_MARK if cut else text), cut


@dataclass
class RateLimit:
    """A token bucket per instance: `rate` lines a second, bursts of `burst`. Lines over it are dropped and counted;
    `take_dropped` hands the count over once a line may go again (the report itself is not rate limited, and comes
    at most once per admitted line)."""

    rate: float
    burst: int
    _tokens: float = -1.0
    _at: float = 0.0
    dropped: int = 0  # since the last report
    dropped_total: int = 0

    def admit(self, now: float) -> bool:
        if self._tokens < 0:
            self._tokens, self._at = float(self.burst), now
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.dropped += 1
        self.dropped_total += 1
        return False

    def take_dropped(self) -> int:
        count, self.dropped = self.dropped, 0
        return count


@dataclass
class OutputGate:
    """The rate limit applied to raw bytes, before any line is cut: in the reader's thread, so that a flood costs
    the event loop only what it may ship. Per instance (both streams together) a token bucket of `rate` lines a
    second, bursts of `burst`; a line takes its token when its first byte comes. Once the bucket is empty the rest of
    a chunk is skipped and its lines counted with `bytes.count` (C speed, no list), so the Python work of a chunk is
    bounded by the tokens, however many lines it holds. What passes is whole lines (and the head of the one in
    progress): at most `burst` lines a call, each still cut at `log_line_bytes` by LineSplitter, which skips the rest
    of an over-long line at C speed too (and counts its bytes exactly)."""

    rate: float
    burst: int
    dropped: int = 0  # lines skipped since the last `take_dropped`
    _tokens: float = -1.0
    _at: float = 0.0
    _where: dict[str, int] = field(default_factory=dict)  # per stream

    def admit(self, stream: str, data: bytes, now: float) -> bytes:
        """What of `data` may go on to be cut into lines; the lines skipped are added to `dropped`."""
        if self._tokens < 0:
            self._tokens, self._at = float(self.burst), now
        self._tokens = min(float(self.burst), self._tokens + max(0.0, now - self._at) * self.rate)
        self._at = now
        where = self._where.get(stream, _AT_START)
        passed: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            if where == _AT_START:
                if self._tokens < 1.0:  # the rest of the chunk goes: count its lines, never split them
                    self.dropped += data.count(b"\n", pos)
                    where = _AT_START if data.endswith(b"\n") else _DROPPING
                    break
                self._tokens -= 1.0
                where = _PASSING
            newline = data.find(b"\n", pos)
            end = size if newline < 0 else newline + 1
            if where == _PASSING:
                passed.append(data[pos:end])
            elif newline >= 0:  # the end of a line dropped in an earlier chunk
                self.dropped += 1
            if newline >= 0:
                where = _AT_START
            pos = end
        self._where[stream] = where
        return b"".join(passed)

    def take_dropped(self) -> int:
        count, self.dropped = self.dropped, 0
        return count


def dropped_message(count: int) -> str:
    return f"{count} line{'s' if count != 1 else ''} dropped (the instance wrote faster than its output limit)"
