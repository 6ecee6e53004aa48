"""The proxy's local view of the registry, kept current by watching the KV buckets (never by polling).

Two watches run as children of the service's task group: instances and functions. Each change replaces the
`changed` event after setting it, so a waiting client grabs the current event, looks at the view, and sleeps
until the next change. The view may lag the KV by a moment; claims stay exact because they are
compare-and-set writes on the revision, and a stale revision only loses its race.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from aube.shared import records
from aube.shared.registry import InstanceEntry, Registry
from aube.shared.schemas import FunctionRecord

log = logging.getLogger(__name__)


class Pool:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.entries: dict[str, InstanceEntry] = {}
        self.functions: dict[str, FunctionRecord] = {}
        self.changed = asyncio.Event()
        # Called on every change once caught up (the proxy offers newly free instances to waiting clients).
        self.listeners: list[Callable[[], None]] = []
        # The streams this replica carries, by key: (instance id, what to call once its entry is gone).
        self._carried: dict[str, tuple[str, Callable[[], None]]] = {}

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()
        for listener in self.listeners:
            listener()

    def function(self, name: str) -> FunctionRecord | None:
        fn = self.functions.get(name)
        return None if fn is None or fn.deleting else fn

    def entries_of(self, name: str) -> list[InstanceEntry]:
        prefix = name + "."
        return [e for k, e in self.entries.items() if k.startswith(prefix)]

    def carried(self, entry: InstanceEntry, on_gone: Callable[[], None]) -> None:
        """Call `on_gone` once the registry no longer accounts for the instance at `entry`: its entry was deleted or
        now names another instance. A stream lives only while its claim does: once the entry is gone (its host was
        judged dead, its instance exited, reconcile dropped it) the platform no longer counts the instance against
        `max_instances` nor keeps it from the next client, so the stream must end. `forget` when the stream ends.

        Only a delete or a new instance ends it, never a state the view shows: the view may lag behind this
        replica's own claim (showing the entry still free)."""
        self._carried[entry.key] = (entry.record.instance_id, on_gone)

    def forget(self, entry: InstanceEntry) -> None:
        held = self._carried.get(entry.key)
        if held is not None and held[0] == entry.record.instance_id:
            del self._carried[entry.key]

    def _check_carried(self, key: str) -> None:
        held = self._carried.get(key)
        if held is None:
            return
        current = self.entries.get(key)
        if current is None or current.record.instance_id != held[0]:
            del self._carried[key]
            held[1]()

    async def watch_instances(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ready = False
        async for change in self.registry.watch_instances():
            if change is None:
                if not ready:
                    ready = True
                    task_status.started()
                continue
            if change.record is None:
                self.entries.pop(change.key, None)
            else:
                old = self.entries.get(change.key)
                # The watch delivers in revision order, but a key deleted and re-created restarts nothing:
                # revisions are stream sequences, so they only grow.
                if old is None or old.revision < change.revision:
                    self.entries[change.key] = InstanceEntry(change.key, change.revision, change.record)
            self._check_carried(change.key)
            if ready:
                self._notify()

    async def watch_functions(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        ready = False
        async for entry in self.registry.watch_functions():
            if entry is None:
                if not ready:
                    ready = True
                    task_status.started()
                continue
            if entry.value is None:
                self.functions.pop(entry.key, None)
            else:
                # A record from a newer or broken writer must not stop routing, nor route: skipped (and logged).
                record = records.read(entry.key, entry.value, FunctionRecord)
                if record is None:
                    self.functions.pop(entry.key, None)
                    continue
                self.functions[entry.key] = record
            if ready:
                self._notify()
