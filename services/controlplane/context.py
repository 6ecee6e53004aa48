"""What the control plane's parts share: its settings and connections, the work under way in this process, and
the per-function lock.

The parts (uploads.py, instances.py, functions.py, housekeeping.py) each own one concern; they coordinate only
through this object. The sets below are how one part learns what another is doing right now in this process, so
that, say, reconcile does not stop an instance an upload is starting, or retirement does not race a delete.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from nats.aio.client import Client as NATS
from nats.js.object_store import ObjectStore

from aube.controlplane.bundle import BundleLimits
from aube.controlplane.events import Events, deployer_redactor
from aube.controlplane.metrics import ControlPlaneMetrics
from aube.controlplane.runtimes.base import Runtime
from aube.shared.errors import InvalidRequest
from aube.shared.registry import Registry
from aube.shared.settings import ControlPlaneSettings

# Bounded cleanup after a failure or a cancellation: long enough to stop a container, short enough not to hang.
CLEANUP_SECONDS = 30.0


class Context:
    def __init__(
        self,
        settings: ControlPlaneSettings,
        nc: NATS,
        registry: Registry,
        runtime: Runtime,
        bundles: ObjectStore,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.registry = registry
        self.runtime = runtime
        self.bundles = bundles
        self.owner = settings.owner
        try:
            self.limits = BundleLimits.from_settings(settings)
        except ValueError as e:
            raise InvalidRequest(f"bad setting: {e}") from e
        self.redactor = deployer_redactor(settings)
        self.events = Events(nc, self.redactor)
        self.metrics = ControlPlaneMetrics()  # served on the operator address (service.py)
        self.in_flight: set[str] = set()  # instance ids this process is starting right now
        # Every id that was in flight at any moment of the current reconcile pass (see `Housekeeping.reconcile`).
        self.in_flight_during_pass: set[str] = set()
        self.uploading: set[str] = set()  # function names with an upload under way here
        # Function names with a scale request under way here: the min_free keeper leaves them to it (upkeep.py).
        self.scaling: set[str] = set()
        self._function_locks: dict[str, anyio.Lock] = {}
        self.work_dir = Path(settings.data_dir) / "uploads"

    @asynccontextmanager
    async def function_lock(self, name: str) -> AsyncIterator[None]:
        """One upload or delete of a function at a time in this process; retirement leaves its instances alone
        meanwhile (`uploading`)."""
        lock = self._function_locks.setdefault(name, anyio.Lock())
        async with lock:
            self.uploading.add(name)
            try:
                yield
            finally:
                self.uploading.discard(name)

    def url(self, name: str) -> str:
        return f"{self.settings.public_url.rstrip('/')}/{name}"
