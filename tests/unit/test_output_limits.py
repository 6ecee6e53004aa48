"""The pure parts of `aube logs`: lines cut from bytes and bounded, the rate limit per instance and its drop count,
the CLI's durations, and the NATS permissions and exports that scope lines to hosts and tenants."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from aube.cli.logs import parse_duration
from aube.controlplane.logship import log_subject
from aube.controlplane.outputlimits import TRUNCATION_MARK, LineSplitter, OutputGate, RateLimit, dropped_message
from aube.controlplane.runtimes.output import MAX_FILE, OutputOf, ProcessOutput, make_folder
from aube.shared import agentlogins, names, tenants
from aube.shared.errors import InvalidRequest

HASH = "$2a$10$" + "a" * 53


def test_lines_are_cut_from_chunks_whatever_their_boundaries() -> None:
    splitter = LineSplitter(max_bytes=100)
    assert splitter.feed(b"hel") == []
    assert splitter.feed(b"lo\nwor") == [("hello", 0)]
    assert splitter.feed(b"ld\r\n\n") == [("world", 0), ("", 0)]
    assert splitter.feed("é\n".encode()) == [("é", 0)]
    assert splitter.feed(b"tail") == []
    assert splitter.flush() == [("tail", 0)]
    assert splitter.flush() == []


def test_an_over_long_line_is_cut_and_its_rest_skipped_without_growing_the_buffer() -> None:
    splitter = LineSplitter(max_bytes=10)
    assert splitter.feed(b"x" * 25) == []
    assert splitter.feed(b"y" * 1_000_000) == []
    assert len(splitter._pending) == 10  # bounded, however long the line
    assert splitter.feed(b"z\nnext\n") == [("x" * 10 + TRUNCATION_MARK, 15 + 1_000_001), ("next", 0)]


def test_the_rate_limit_admits_a_burst_then_the_rate_and_counts_the_rest() -> None:
    limit = RateLimit(rate=8, burst=5)
    admitted = sum(limit.admit(100.0) for _ in range(1000))
    assert admitted == 5 and limit.dropped == 995
    assert limit.take_dropped() == 995 and limit.take_dropped() == 0
    assert limit.admit(100.0625) is False  # half a token
    assert limit.admit(100.125) is True  # one more after 1/rate
    # A second later the bucket holds `rate` tokens, capped at `burst`.
    assert sum(limit.admit(101.125 + i / 1024) for i in range(100)) == 5
    assert limit.dropped_total == 995 + 1 + 95
    assert dropped_message(1) == "1 line dropped (the instance wrote faster than its output limit)"


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("250ms", 0.25)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "m", "1h junk", "-"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_duration(text)


def test_lines_go_to_the_functions_tenant_and_name_where_they_were_read() -> None:
    assert log_subject("alice", "fn", "h1") == "aube.t.alice.logs.fn.fn.h1"
    assert log_subject("", "fn", names.LOGS_LOCAL_ORIGIN) == "aube.logs.fn.fn._local"
    assert not names.HOST_ID_PATTERN.fullmatch(names.LOGS_LOCAL_ORIGIN)  # no host can pass for the control plane


def test_a_host_agent_may_publish_lines_naming_its_own_host_only() -> None:
    rendered = agentlogins.render_users({"h1": HASH})
    assert '"aube.logs.fn.*.h1"' in rendered and '"aube.t.*.logs.fn.*.h1"' in rendered
    assert "aube.logs.fn.>" not in rendered and "_local" not in rendered


def test_each_tenant_gets_its_own_lines_and_the_logs_service_only() -> None:
    hashes = {"alice": HASH, "bob": HASH}
    streams = [names.SUBJECT_EVENTS_PREFIX, names.SUBJECT_LOGS_PREFIX]
    exports = tenants.render_exports(hashes, [names.SUBJECT_LOGS], streams)
    assert '{stream: "aube.t.alice.logs.fn.>", accounts: [alice]}' in exports
    assert '{service: "aube.t.bob.fn.logs", accounts: [bob]' in exports
    accounts = tenants.render_accounts(hashes, [names.SUBJECT_LOGS], streams, "aube-bundles", "1MB")
    alice = accounts[accounts.index("alice: {") : accounts.index("bob: {")]
    assert 'subject: "aube.t.alice.logs.fn.>"}, to: "aube.logs.fn.>"' in alice
    assert "aube.t.bob" not in alice


def test_process_output_is_read_from_the_watch_on_and_its_files_cut_once_read(tmp_path: Path) -> None:
    """runtimes/output.py on real files: an instance running when the watch begins is read from then on, one found
    later from its first byte; a file read to its end past MAX_FILE is cut back to nothing (the disk stays bounded)
    and the writer's next appends are read from its new start; a folder gone closes its instance."""
    old = OutputOf(function="fn", instance_id="old", tenant="alice")
    make_folder(tmp_path / "old", old)
    with (tmp_path / "old" / "stdout").open("ab") as f:
        f.write(b"before the watch\n")
    watch = ProcessOutput(tmp_path, rate=100, burst=200, max_file=8 << 20)
    assert watch._pass(first=True) == ([], [])
    new = OutputOf(function="fn", instance_id="new", tenant="alice")
    make_folder(tmp_path / "new", new)
    big = b"x" * (MAX_FILE + 10) + b"\n"
    # Unbuffered, as the instance's print(flush=True) writes.
    with (
        (tmp_path / "old" / "stderr").open("ab", buffering=0) as err,
        (tmp_path / "new" / "stdout").open("ab", buffering=0) as out,
    ):
        err.write(b"oops\n")
        out.write(big)
        chunks, ended = watch._pass(first=False)
        assert (old, "stderr", b"oops\n") in chunks and ended == []
        read = b"".join(data for of, stream, data in chunks if of == new)
        while len(read) < len(big):
            read += b"".join(data for _, _, data in watch._pass(first=False)[0])
        assert read == big
        assert (tmp_path / "new" / "stdout").stat().st_size == 0  # cut once read
        out.write(b"after the cut\n")
        assert watch._pass(first=False)[0] == [(new, "stdout", b"after the cut\n")]
    (tmp_path / "old" / "meta.json").unlink()
    for name in ("stdout", "stderr"):
        (tmp_path / "old" / name).unlink()
    (tmp_path / "old").rmdir()
    assert watch._pass(first=False) == ([], [old])


def test_the_gate_lets_a_burst_of_whole_lines_through_and_counts_the_rest_across_chunks() -> None:
    gate = OutputGate(rate=10, burst=3)
    assert gate.admit("stdout", b"a\nb\nc\nd\ne\nhalf", 100.0) == b"a\nb\nc\n"
    assert gate.dropped == 2  # d, e; "half" is counted when its line ends
    assert gate.admit("stdout", b"-line\nf\n", 100.0) == b""
    assert gate.take_dropped() == 4 and gate.dropped == 0
    # A token a tenth of a second later: a line begun is let through to its end, over chunks, whatever its length.
    assert gate.admit("stderr", b"long", 100.15) == b"long"
    assert gate.admit("stderr", b"er\nnext\n", 100.15) == b"er\n"
    assert gate.take_dropped() == 1


def test_a_flood_of_empty_lines_costs_the_event_loop_a_burst_not_a_list_of_every_line(tmp_path: Path) -> None:
    """Red team: an instance writing b"\\n" endlessly made the shipper build a tuple per line on the event loop
    (1.5 s a MiB). Now the reader's gate, in its thread, lets through at most the burst (plus the rate meanwhile)
    and counts the rest; what reaches the loop is cut into at most that many lines."""
    of = OutputOf(function="fn", instance_id="flood", tenant="alice")
    watch = ProcessOutput(tmp_path, rate=100, burst=200, max_file=16 << 20)
    assert watch._pass(first=True) == ([], [])
    make_folder(tmp_path / "flood", of)
    flood = 8 * 1024 * 1024
    (tmp_path / "flood" / "stdout").write_bytes(b"\n" * flood)
    started = time.monotonic()
    splitter, lines, dropped = LineSplitter(max_bytes=2048), 0, 0
    while True:
        chunks, _ = watch._pass(first=False)
        dropped += sum(count for _, count in watch.drops)
        if not chunks and not watch.drops:
            break
        for _, _, data in chunks:
            lines += len(splitter.feed(data))
    elapsed = time.monotonic() - started
    assert elapsed < 0.5
    assert lines <= 200 + 100 * elapsed + 1
    assert lines + dropped == flood


def test_an_output_file_grown_past_the_limit_is_cut_unread_and_counted(tmp_path: Path) -> None:
    """Red team: os.ftruncate(1, 1 << 40) made a sparse terabyte whose end the reader never reached, so it was never
    cut. A file larger than `max_file` is cut at once, whatever was read of it."""
    of = OutputOf(function="fn", instance_id="giant", tenant="alice")
    watch = ProcessOutput(tmp_path, rate=100, burst=200, max_file=8 << 20)
    make_folder(tmp_path / "giant", of)
    assert watch._pass(first=False) == ([], [])
    with (tmp_path / "giant" / "stdout").open("ab", buffering=0) as out:
        os.ftruncate(out.fileno(), 1 << 40)
        assert watch._pass(first=False) == ([], [])
        assert watch.drops == [(of, 1)]
        assert os.fstat(out.fileno()).st_size == 0
        out.write(b"after\n")
        assert watch._pass(first=False)[0] == [(of, "stdout", b"after\n")]
