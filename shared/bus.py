"""Requests over NATS with typed replies: the one place that turns a silent timeout into an error."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from aube.shared.errors import ServiceUnavailable
from aube.shared.schemas import decode_reply, encode

T = TypeVar("T")


async def request(nc: NATS, subject: str, body: msgspec.Struct, reply_kind: type[T], timeout: float) -> T:
    """Send `body` to `subject` and decode the reply; an error reply raises its AubeError."""
    try:
        msg = await nc.request(subject, encode(body), timeout=timeout)
    except NoRespondersError as e:
        who = "its host agent" if subject.startswith("aube.host.") else "the control plane"
        raise ServiceUnavailable(f"no service is answering on {subject} (is {who} running?)") from e
    except NatsTimeoutError as e:
        raise ServiceUnavailable(f"no reply on {subject} within {timeout:g}s") from e
    return decode_reply(msg.data, reply_kind)
