"""The control plane assembled: one object per concern, sharing one `Context`, behind the entry points that the
service shell (service.py), the upkeep loops (upkeep.py) and the tests call.

Nothing is decided here: uploads.py owns upload, instances.py the instances' lifecycle and the scale and
stop-instance requests, functions.py delete and list, housekeeping.py retirement, reconcile and shutdown.
"""

from __future__ import annotations

from nats.aio.client import Client as NATS
from nats.js.object_store import ObjectStore

from aube.controlplane.bundle import BundleLimits
from aube.controlplane.context import Context
from aube.controlplane.functions import Functions
from aube.controlplane.housekeeping import Housekeeping
from aube.controlplane.instances import Instances
from aube.controlplane.metrics import ControlPlaneMetrics
from aube.controlplane.runtimes.base import Runtime
from aube.controlplane.uploads import Uploads
from aube.shared.redact import Redactor
from aube.shared.registry import Registry
from aube.shared.settings import ControlPlaneSettings


class ControlPlane:
    def __init__(
        self,
        settings: ControlPlaneSettings,
        nc: NATS,
        registry: Registry,
        runtime: Runtime,
        bundles: ObjectStore,
    ) -> None:
        self.context = Context(settings, nc, registry, runtime, bundles)
        self.instances = Instances(self.context)
        self.housekeeping = Housekeeping(self.context, self.instances)
        self.uploads = Uploads(self.context, self.instances)
        self.functions = Functions(self.context, self.instances, self.housekeeping)
        # Requests (service.py routes them by subject).
        self.upload = self.uploads.upload
        self.delete = self.functions.delete
        self.list = self.functions.list
        self.scale = self.instances.scale
        self.stop_instance = self.instances.stop_instance
        # Loops and shutdown (service.py, upkeep.py).
        self.reconcile = self.housekeeping.reconcile
        self.retire_pass = self.housekeeping.retire_pass
        self.stop_everything = self.housekeeping.stop_everything
        self.start_warm = self.instances.start_warm

    # What the upkeep loops, the service and the tests read: the context's own objects, never copies.

    @property
    def settings(self) -> ControlPlaneSettings:
        return self.context.settings

    @property
    def registry(self) -> Registry:
        return self.context.registry

    @property
    def runtime(self) -> Runtime:
        return self.context.runtime

    @property
    def owner(self) -> str:
        return self.context.owner

    @property
    def metrics(self) -> ControlPlaneMetrics:
        return self.context.metrics

    @property
    def limits(self) -> BundleLimits:
        return self.context.limits

    @property
    def redactor(self) -> Redactor:
        return self.context.redactor

    @property
    def in_flight(self) -> set[str]:
        return self.context.in_flight

    @property
    def uploading(self) -> set[str]:
        return self.context.uploading

    @property
    def scaling(self) -> set[str]:
        return self.context.scaling
