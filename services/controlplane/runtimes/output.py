"""Reading instances' output for `aube logs`: what a runtime hands the shipper, and the process runtime's reader.

A runtime that can (Docker, processes) offers `watch_output(owner, sink)`: until cancelled, every byte its
instances of `owner` write on stdout and stderr reaches `sink.write`, tagged with the instance, its function and
the tenant the function belongs to, as recorded by the platform when the instance started (a Docker label, a file
beside the output): never anything the instance says about itself. The shipper (`controlplane/logship.py`) cuts
lines, bounds them and publishes them. Instances found when the watch begins are read from that moment on (their
earlier output was shipped by the watch before, if any); instances started later from their first byte.

Process runtime: each instance writes into its own folder, `<data>/logs/<owner>/<instance id>/` (`stdout`,
`stderr`, `meta.json` = function and tenant), which `ProcessOutput` polls every POLL seconds. A file is cut back to
nothing once it is read to its end and longer than MAX_FILE, so a chatty instance does not fill the disk; bytes
written between that read and the cut are lost (counted nowhere: a window of microseconds in a flood). An instance
cannot make a file larger than `output_max_file_bytes` (its RLIMIT_FSIZE, sandbox.rlimits: a write or ftruncate past
it fails with EFBIG); a file found larger all the same (an instance started without that limit) is cut unread, its
bytes counted as one dropped line; one cut by someone else is read again from its start.

Both readers apply the rate limit in their thread, before anything reaches the event loop (`OutputGate`): a flood of
tiny lines costs the loop at most `log_burst` lines an instance a pass; the lines skipped reach `sink.dropped`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio
import anyio.to_thread
import msgspec

from aube.controlplane.outputlimits import OutputGate
from aube.shared.schemas import OutputStream

logger = logging.getLogger(__name__)

POLL = 0.1  # seconds between reads of the process instances' output files: the floor of `aube logs -f`'s delay
READ_CHUNK = 1024 * 1024  # the most read of one file per poll
MAX_FILE = 1024 * 1024  # a file read to its end and longer than this is cut back to nothing
META_FILE = "meta.json"
STREAMS: tuple[OutputStream, OutputStream] = ("stdout", "stderr")


class OutputOf(msgspec.Struct, frozen=True, kw_only=True):
    """Whose output a chunk is: recorded by the platform when the instance started."""

    function: str
    instance_id: str
    tenant: str  # the function's tenant ("" = the operator's)


class OutputSink(Protocol):
    """Called on the event loop; must not block."""

    def write(self, of: OutputOf, stream: OutputStream, data: bytes) -> None: ...

    def dropped(self, of: OutputOf, lines: int) -> None:
        """`lines` of the instance's output were skipped by the reader (its rate limit, a file cut unread)."""
        ...

    def closed(self, of: OutputOf) -> None:
        """The instance is gone: what is left without a newline is its last line."""
        ...


@runtime_checkable
class OutputSource(Protocol):
    """A runtime whose instances' output can be read (Docker, processes; not `hosts`, whose agents read it)."""

    async def watch_output(self, owner: str, sink: OutputSink) -> None: ...


def make_folder(folder: Path, of: OutputOf) -> None:
    """An instance's output folder with its empty stream files and who it belongs to (before the spawn)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stream in STREAMS:
        (folder / stream).write_bytes(b"")
    (folder / META_FILE).write_text(json.dumps(msgspec.to_builtins(of)))


class _Followed:
    def __init__(self, of: OutputOf, folder: Path, from_end: bool, gate: OutputGate) -> None:
        self.of = of
        self.folder = folder
        self.gate = gate
        self.offsets = {s: _size(folder / s) if from_end else 0 for s in STREAMS}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_meta(folder: Path) -> OutputOf | None:
    try:
        return msgspec.json.decode((folder / META_FILE).read_bytes(), type=OutputOf)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


class ProcessOutput:
    """Polls the output folders of one owner's process instances."""

    def __init__(self, root: Path, rate: float, burst: int, max_file: int) -> None:
        self.root = root  # <data>/logs/<owner>
        self.rate, self.burst = rate, burst  # each instance's OutputGate
        self.max_file = max_file  # a file larger than this is cut, read or not
        self.followed: dict[str, _Followed] = {}
        self.drops: list[tuple[OutputOf, int]] = []  # lines skipped in the last pass

    async def watch(self, sink: OutputSink) -> None:
        first = True
        while True:
            chunks, ended = await anyio.to_thread.run_sync(self._pass, first)
            first = False
            for of, stream, data in chunks:
                sink.write(of, stream, data)
            for of, lines in self.drops:
                sink.dropped(of, lines)
            for of in ended:
                sink.closed(of)
            await anyio.sleep(POLL)

    def _pass(self, first: bool) -> tuple[list[tuple[OutputOf, OutputStream, bytes]], list[OutputOf]]:
        """One read of every followed file: the chunks the gates let through, the instances gone; `drops` the lines
        skipped."""
        self.drops = []
        try:
            present = {entry.name for entry in os.scandir(self.root) if entry.is_dir()}
        except OSError:
            present = set()
        ended = [self.followed.pop(gone).of for gone in set(self.followed) - present]
        for instance_id in present - set(self.followed):
            of = _read_meta(self.root / instance_id)
            if of is not None and of.instance_id == instance_id:
                gate = OutputGate(rate=self.rate, burst=self.burst)
                self.followed[instance_id] = _Followed(of, self.root / instance_id, from_end=first, gate=gate)
        chunks: list[tuple[OutputOf, OutputStream, bytes]] = []
        now = time.time()
        for followed in self.followed.values():
            for stream in STREAMS:
                data = followed.gate.admit(stream, self._read(followed, stream), now)
                if data:
                    chunks.append((followed.of, stream, data))
            if lines := followed.gate.take_dropped():
                self.drops.append((followed.of, lines))
        return chunks, ended

    def _read(self, followed: _Followed, stream: OutputStream) -> bytes:
        path = followed.folder / stream
        offset = followed.offsets[stream]
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < offset:  # cut meanwhile (not by us): start again from its beginning
                    offset = 0
                if size > self.max_file:
                    # Past the instance's RLIMIT_FSIZE (or ftruncate'd to a sparse giant before it had one): the
                    # reader would never reach its end, so it is cut now and its unread bytes are lost.
                    with contextlib.suppress(OSError):
                        os.truncate(path, 0)
                    followed.offsets[stream] = 0
                    followed.gate.dropped += 1
                    return b""
                f.seek(offset)
                data = f.read(min(READ_CHUNK, size - offset))
                offset += len(data)
                if offset >= size and offset > MAX_FILE:
                    # The writer appends (O_APPEND): after the cut its next write lands at the new end, 0.
                    with contextlib.suppress(OSError):
                        os.truncate(path, 0)
                    offset = 0
        except OSError:
            return b""
        followed.offsets[stream] = offset
        return data
