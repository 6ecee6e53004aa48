"""A zygote that does not answer a fork request in time may still answer later; that late answer must never be read
as the next request's (red-team finding: the next start reported failed though forked, or the reverse). So a zygote
whose request went unanswered is closed and forgotten."""

from __future__ import annotations

import contextlib
import socket
import subprocess

import pytest

from aube.controlplane.runtimes.zygotes import Zygote, ZygoteOutOfStep, Zygotes

pytestmark = pytest.mark.anyio


async def test_a_zygote_that_did_not_answer_in_time_is_forgotten_and_stopped() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stuck = subprocess.Popen(["sleep", "60"])  # alive, answers nothing: a stuck zygote
    try:
        ours.settimeout(0.2)
        zygotes = Zygotes()
        zygote = Zygote(stuck, ours)
        zygotes._by_version["v1"] = zygote  # as `_zygote` would have started it

        with pytest.raises(ZygoteOutOfStep):
            await zygotes.fork("v1", b"", {"env": {}}, [])
        with contextlib.suppress(OSError):  # the late answer to the request given up on: nobody reads it
            theirs.send(b'{"pid": 4242}')
        assert zygotes.pid("v1") is None, "the zygote that went silent is still asked"
        assert stuck.wait(timeout=5) is not None, "the stuck zygote was left running"
    finally:
        stuck.kill()
        theirs.close()
        ours.close()
