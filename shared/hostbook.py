"""The hosts bucket: each host agent's lease (`HostLease`), which the control plane places instances by and the
reaper judges (a host whose lease expires is dead, and its instances' entries are recycled)."""

from __future__ import annotations

import logging

import msgspec
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from aube.shared import buckets, kvread, names, records
from aube.shared.registry import delete_at, get_latest
from aube.shared.schemas import HostLease, encode

log = logging.getLogger(__name__)


class HostEntry(msgspec.Struct, frozen=True):
    key: str  # the host id
    revision: int
    record: HostLease


class HostBook:
    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, replicas: int = 1, resize: buckets.Resize = buckets.Resize.NEVER
    ) -> HostBook:
        """Bind the bucket, created with `replicas` copies when missing (its count changed only as `resize` allows)."""
        return cls(js, await buckets.open_kv(js, names.BUCKET_HOSTS, replicas=replicas, resize=resize))

    async def leases(self) -> list[HostEntry]:
        """Every trustworthy host lease, expired ones included (judging them is the reader's business)."""
        return [
            HostEntry(e.key, e.revision, lease)
            for e in await kvread.snapshot(self.js, names.BUCKET_HOSTS)
            if e.value and (lease := records.read(e.key, e.value, HostLease)) is not None
        ]

    async def lease(self, host_id: str) -> HostLease | None:
        """One host's lease by its key (a single message get, not a snapshot); None if it has none readable."""
        got = await get_latest(self.kv, host_id)
        return None if got is None else records.read(host_id, got[1], HostLease)

    async def put(self, lease: HostLease) -> int:
        return await self.kv.put(lease.host_id, encode(lease))

    async def delete(self, host_id: str, revision: int | None = None) -> bool:
        """Delete (at `revision` if given); False if the lease was renewed meanwhile."""
        return await delete_at(self.kv, host_id, revision)
