"""Reading registry records defensively: decode, then check that a record is one a platform service could have
written, before anything acts on it.

The registry is written only by the platform's own NATS users (deploy/nats.conf), but a record is still input: a
buggy or newer writer, or anyone holding a leaked service password, could put anything there. A record that does
not decode, whose key does not match its contents, or that names an impossible function, slot, version, tenant,
address or scale window is logged and skipped (as if absent), never trusted and never a crash. Pure: no I/O.
"""

from __future__ import annotations

import logging
import re
from typing import TypeVar

import msgspec

from aube.shared import names
from aube.shared import tenants as tenancy
from aube.shared.schemas import FunctionRecord, HostLease, InstanceRecord, ProxyLease, ScaleIntent, decode_record

log = logging.getLogger(__name__)

T = TypeVar("T", FunctionRecord, InstanceRecord, ProxyLease, ScaleIntent, HostLease)
Record = FunctionRecord | InstanceRecord | ProxyLease | ScaleIntent | HostLease

# Far above any operator's max_instances limit, far below what would make a key or a loop absurd.
MAX_SLOT = 100_000
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]{1,253}):([0-9]{1,5})$")
_UNIX = re.compile(r"^unix:/[A-Za-z0-9._/-]{1,200}$")
_PROXY_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def valid_address(address: str) -> bool:
    """`host:port` (port 1-65535) or `unix:/absolute/path` without `..`; empty while starting."""
    if address == "":
        return True
    if _UNIX.fullmatch(address):
        return ".." not in address.split("/")
    match = _HOST_PORT.fullmatch(address)
    return match is not None and 0 < int(match.group(2)) < 65536


def problem(key: str, record: Record) -> str | None:
    """Why `record` under `key` cannot be trusted, or None if it can."""
    if isinstance(record, FunctionRecord):
        if not names.NAME_PATTERN.fullmatch(record.name) or key != record.name:
            return f"function record under {key!r} names {record.name[:80]!r}"
        if record.version < 1:
            return f"version {record.version}"
        if record.tenant != tenancy.OPERATOR and not tenancy.TENANT_PATTERN.fullmatch(record.tenant):
            return f"tenant {record.tenant[:40]!r}"
        return None
    if isinstance(record, InstanceRecord):
        if not names.NAME_PATTERN.fullmatch(record.function) or not 0 <= record.slot < MAX_SLOT:
            return f"instance record names function {record.function[:80]!r} slot {record.slot}"
        if key != names.instance_key(record.function, record.slot):
            return f"instance record for {record.function}.{record.slot} stored under {key!r}"
        if record.version < 1:
            return f"version {record.version}"
        if not valid_address(record.address):
            return f"address {record.address[:80]!r}"
        if record.host and not names.HOST_ID_PATTERN.fullmatch(record.host):
            return f"host {record.host[:40]!r}"
        return None
    if isinstance(record, HostLease):
        if not names.HOST_ID_PATTERN.fullmatch(record.host_id) or key != record.host_id:
            return f"host lease under {key!r} for {record.host_id[:40]!r}"
        if record.ttl <= 0 or record.capacity < 0:
            return f"host lease of {record.host_id} with ttl {record.ttl}, capacity {record.capacity}"
        return None
    if isinstance(record, ScaleIntent):
        if not names.NAME_PATTERN.fullmatch(record.function) or key != record.function:
            return f"scale intent under {key!r} names {record.function[:80]!r}"
        if not _PROXY_ID.fullmatch(record.proxy_id):
            return f"scale intent by {record.proxy_id[:80]!r}"
        # A window longer than the bucket keeps an intent would block scaling for longer than any asker may.
        window = record.expires_at - record.asked_at
        if not 0 <= window <= names.SCALE_INTENT_MAX_AGE:  # also false for NaN
            return f"scale intent window {window}"
        return None
    if not _PROXY_ID.fullmatch(record.proxy_id) or key != record.proxy_id or record.ttl <= 0:
        return f"lease under {key!r} for {record.proxy_id[:80]!r} (ttl {record.ttl})"
    return None


def read(key: str, value: bytes, kind: type[T]) -> T | None:
    """The record in `value` if it decodes and passes `problem`; else None, with a warning in the log."""
    try:
        record = decode_record(value, kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        log.warning("registry: unreadable %s under %r skipped: %s", kind.__name__, key[:120], e)
        return None
    why = problem(key, record)
    if why is not None:
        log.warning("registry: untrustworthy %s under %r skipped: %s", kind.__name__, key[:120], why)
        return None
    return record
