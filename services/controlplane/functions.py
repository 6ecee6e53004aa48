"""A deployer's requests about a function as a whole, besides upload: delete it, list what runs.

Its own module because both answer from the function records with the tenant's view applied: another tenant's
function is `unknown_function` to the requester, as if it did not exist.
"""

from __future__ import annotations

import logging
import time

import msgspec

from aube.controlplane.context import Context
from aube.controlplane.housekeeping import Housekeeping
from aube.controlplane.instances import Instances
from aube.shared import names
from aube.shared import tenants as tenancy
from aube.shared.errors import AubeError, UnknownFunction
from aube.shared.registry import FunctionEntry
from aube.shared.schemas import DeleteReply, DeleteRequest, FunctionSummary, ListReply, ListRequest

log = logging.getLogger(__name__)


class Functions:
    def __init__(self, ctx: Context, instances: Instances, housekeeping: Housekeeping) -> None:
        self.ctx = ctx
        self.instances = instances
        self.housekeeping = housekeeping

    async def delete(self, req: DeleteRequest, tenant: str = tenancy.OPERATOR) -> DeleteReply:
        name = names.validate_name(req.name)
        async with self.ctx.function_lock(name):
            function = await self._owned(name, tenant)
            if function is None:
                raise UnknownFunction(f"no function named {name!r}")
            marked = msgspec.structs.replace(function.record, deleting=True, updated_at=time.time())
            if await self.ctx.registry.put_function(marked, function.revision) is None:
                raise AubeError(f"{name} changed while deleting it; try again", code="conflict")
            grace = self.ctx.settings.delete_grace if req.grace is None else max(0.0, req.grace)
            stopped, streaming = await self.instances.retire_old_versions(
                name, current=None, deadline=time.time() + grace
            )
            if streaming == 0:
                await self.housekeeping.finish_delete(name)
        await self.ctx.events.emit(
            name,
            "deleted",
            tenant=function.record.tenant,
            message=f"{stopped} stopped, {streaming} finishing their streams",
        )
        log.info("function %s deleted: %d instance(s) stopped, %d still streaming", name, stopped, streaming)
        return DeleteReply(name=name, stopped=stopped, draining=streaming)

    async def list(self, req: ListRequest, tenant: str = tenancy.OPERATOR) -> ListReply:
        functions = [
            f
            for f in await self.ctx.registry.functions()
            if not f.record.deleting and tenancy.may_touch(tenant, f.record.tenant)
        ]
        if req.name is not None:
            functions = [f for f in functions if f.record.name == req.name]
        instances = await self.ctx.registry.instances()
        summaries = []
        for f in sorted(functions, key=lambda f: f.record.name):
            mine = [e.record for e in instances if e.record.function == f.record.name]
            summaries.append(
                FunctionSummary(
                    name=f.record.name,
                    version=f.record.version,
                    instances=len(mine),
                    free=sum(r.state == "free" for r in mine),
                    busy=sum(r.state == "busy" for r in mine),
                    runtime=f.record.runtime,
                    min_free=f.record.manifest.scaling.min_free,
                    max_instances=f.record.manifest.scaling.max_instances,
                    url=self.ctx.url(f.record.name),
                )
            )
        return ListReply(functions=summaries)

    async def _owned(self, name: str, tenant: str) -> FunctionEntry | None:
        """The live function `name` if `tenant` may touch it; None if there is none. Another tenant's function is
        `unknown_function` to the requester, as if it did not exist."""
        entry = await self.ctx.registry.get_function(name)
        if entry is None or entry.record.deleting:
            return None
        if not tenancy.may_touch(tenant, entry.record.tenant):
            raise UnknownFunction(f"no function named {name!r}")
        return entry
