"""Function events (`aube.events.<name>`): what a deployer follows of an upload, a scale or a delete.

Its own module because every event reaches a deployer: the redaction and the bound on what an event carries, and
the choice of the account it is published in, are decided here once for every operation that reports progress.
"""

from __future__ import annotations

import logging
import time

import msgspec
from nats.aio.client import Client as NATS

from aube.shared import names
from aube.shared import tenants as tenancy
from aube.shared.redact import MAX_LINE_BYTES, Redactor, platform_redactor, url_passwords
from aube.shared.schemas import EventKind, FunctionEvent, encode
from aube.shared.settings import ControlPlaneSettings

log = logging.getLogger(__name__)


def deployer_redactor(settings: ControlPlaneSettings) -> Redactor:
    """Events and error replies reach deployers: everything they carry goes through this."""
    own = [settings.nats_password, settings.nats_fetch_password]
    secrets = url_passwords(settings.nats_url) + [p for p in own if p]
    return platform_redactor(secrets=secrets, data_dir=settings.data_dir)


class Events:
    def __init__(self, nc: NATS, redactor: Redactor) -> None:
        self.nc = nc
        self.redactor = redactor

    async def emit(self, name: str, event: EventKind, *, tenant: str, **fields: object) -> None:
        """Publish an event where only `tenant` (the function's, or the requester's) can follow it; its message is
        redacted and bounded like a reply's."""
        message = fields.get("message")
        if isinstance(message, str):
            if event == "build":
                fields["message"] = self.redactor.for_deployer(message, max_bytes=MAX_LINE_BYTES, max_lines=8)
            else:
                fields["message"] = self.redactor.for_deployer(message)
        body = msgspec.convert({"name": name, "event": event, "at": time.time(), **fields}, FunctionEvent)
        subject = names.events_subject(name)
        if tenant != tenancy.OPERATOR:
            subject = tenancy.tenant_subject(tenant, subject)
        try:
            await self.nc.publish(subject, encode(body))
        except Exception:  # an event is advisory: losing one must not fail the operation it reports
            log.warning("could not publish %s event for %s", event, name, exc_info=True)
