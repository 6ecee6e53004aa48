"""The control plane's own passes, run on a timer rather than on a request: retirement, reconcile, and the
shutdown that stops everything.

Its own module because these passes repair what requests leave behind (a delete's grace running out, a retired
version still streaming, a lost stop request, an instance the runtime or the registry alone knows of) and must
step aside for the requests under way in this process (`Context.in_flight`, `Context.uploading`). The decisions
are `decisions.plan_retirement` and `decisions.plan_reconcile`; this module carries them out.
"""

from __future__ import annotations

import logging
import time

from aube.controlplane import decisions
from aube.controlplane.context import Context
from aube.controlplane.instances import Instances

log = logging.getLogger(__name__)

# A draining/unhealthy entry nobody stopped for this long lost its stop request; retirement stops it.
STALE_DRAINING_SECONDS = 10.0


class Housekeeping:
    def __init__(self, ctx: Context, instances: Instances) -> None:
        self.ctx = ctx
        self.instances = instances
        self._first_seen: dict[tuple[str, int], float] = {}

    async def finish_delete(self, name: str) -> None:
        """The last instance of a deleted function is gone: drop its record and every prepared version."""
        for artifact in await self.ctx.runtime.artifacts(self.ctx.owner):
            if artifact.function == name:
                await self.ctx.runtime.remove_artifact(artifact.ref)
        entry = await self.ctx.registry.get_function(name)
        if entry is not None and entry.record.deleting:
            await self.ctx.registry.delete_function(name)

    async def stop_everything(self) -> None:
        """Stop every instance this control plane owns and drop their entries (a clean platform shutdown)."""
        for entry in await self.ctx.registry.instances():
            if entry.record.owner == self.ctx.owner:
                await self.instances.stop_entry(entry, reason="platform shutdown")
        for running in await self.ctx.runtime.instances(self.ctx.owner):
            await self.ctx.runtime.stop(running.handle)

    async def retire_pass(self) -> None:
        """Stop what retirement, delete's grace or a lost stop request left behind; finish deletes."""
        now = time.time()
        entries = await self.ctx.registry.instances()
        functions = await self.ctx.registry.functions()
        live = {(e.key, e.revision) for e in entries if e.record.state in ("draining", "unhealthy")}
        self._first_seen = {k: self._first_seen.get(k, now) for k in live}
        plan = decisions.plan_retirement(
            owner=self.ctx.owner,
            entries=entries,
            functions=functions,
            in_flight=self.ctx.in_flight,
            now=now,
            stale_after=STALE_DRAINING_SECONDS,
            first_seen=self._first_seen,
        )
        for entry in plan.stop:
            if entry.record.function in self.ctx.uploading:
                # An upload or delete of this function holds its lock and retires these instances itself; stopping
                # them here too raced it (a delete counted fewer instances stopped than it had).
                continue
            if entry.record.state == "busy":
                log.warning(
                    "instance %s of deleted %s still streaming after the grace period: stopping it",
                    entry.record.instance_id,
                    entry.record.function,
                )
                await self.instances.drain_and_stop(entry, reason="delete grace period over", busy_ok=True)
            else:
                await self.instances.drain_and_stop(entry, reason="retired")
        for name in plan.finished_deletes:
            if name not in self.ctx.uploading:
                await self.finish_delete(name)

    async def reconcile(self, *, startup: bool = False) -> decisions.ReconcilePlan:
        """Make the runtime and the registry agree; see decisions.plan_reconcile for the rules and the order.

        The runtime listing is older than the plan: an instance listed while still being created (not yet running)
        may have finished starting by the time the plan is made. So every instance that was in flight at any
        moment of this pass counts as in flight, not just those still starting at the end.
        """
        self.ctx.in_flight_during_pass = set(self.ctx.in_flight)
        inventory = await self.ctx.runtime.inventory(self.ctx.owner)
        running = inventory.instances
        artifacts = await self.ctx.runtime.artifacts(self.ctx.owner)
        entries = [e for e in await self.ctx.registry.instances() if inventory.covers(e.record.host)]
        functions = await self.ctx.registry.functions()
        plan = decisions.plan_reconcile(
            owner=self.ctx.owner,
            running=running,
            entries=entries,
            functions=functions,
            artifacts=artifacts,
            in_flight=self.ctx.in_flight_during_pass | self.ctx.in_flight,
            busy_uploads=set(self.ctx.uploading),
            now=time.time(),
            start_timeout=self.ctx.settings.start_timeout,
            startup=startup,
        )
        for handle in plan.stop_handles:
            log.warning("reconcile: stopping instance %s, unknown to the registry or exited", handle)
            await self.ctx.runtime.stop(handle)
        for entry in plan.delete_entries:
            log.warning("reconcile: dropping registry entry %s, its instance is gone", entry.key)
            await self.ctx.registry.delete_instance(entry.key, entry.revision)
        for ref in plan.remove_artifacts:
            log.info("reconcile: removing unused version %s", ref)
            await self.ctx.runtime.remove_artifact(ref)
        self.ctx.metrics.reconciled("stop_instance", len(plan.stop_handles))
        self.ctx.metrics.reconciled("drop_entry", len(plan.delete_entries))
        self.ctx.metrics.reconciled("remove_version", len(plan.remove_artifacts))
        return plan
