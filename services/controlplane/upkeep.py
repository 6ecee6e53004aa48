"""Keeping the registry true and the warm pool full between requests: instance exits and the `min_free` keeper.

The runtime reports each instance that ends (`Runtime.watch_exits`: the engine's event stream, or a pidfd per
process) the moment it ends. Its registry entry is then deleted by compare-and-set, in whatever state it is:
- free, starting (not started by this process), unhealthy, draining: nothing may be sent there any more;
- busy: the stream it carried ended with the instance, so its proxy has nothing left to release. Deleting it
  lets the reaper and the keeper see the slot as it is; the proxy's release then finds no entry of that instance
  and has nothing to do (proxy/holdings.py `release`). A claim racing the delete makes the delete lose; the entry
  is read again and deleted at its new revision, so a claimed dead instance does not stay in the registry either.
The dead instance's leftovers (a stopped container, a cgroup) are removed afterwards, except for a starting or
draining one: whoever started or drained it is removing it already. Reconcile stays the backstop for an exit the
watch missed (it was down, or the control plane was). An exit reported before any entry records its handle (the
instance ended between its health check and the write that makes it free) is looked for again every round for
`UNMATCHED_MEMORY` seconds.

The keeper starts instances for every function whose warm ones (free or starting, current version) are fewer than
`min_free`, within `max_instances` (`decisions.plan_top_up`), after each exit and every `KEEP_INTERVAL` seconds,
so the pool is refilled without waiting for a client. A function whose top-ups fail to start, or end within
`EARLY_EXIT_SECONDS` (a crash loop), is held back for a doubling delay (`decisions.hold_after_failures`); the count
starts again after `FAILURES_FORGOTTEN` quiet seconds. Instances killed from outside (an operator, the OOM killer)
are replaced at once: only the keeper's own instances' early exits count.
"""

from __future__ import annotations

import logging
import time

import anyio
from anyio.abc import TaskGroup

from aube.controlplane import decisions
from aube.controlplane.core import ControlPlane
from aube.shared.errors import AubeError
from aube.shared.registry import InstanceEntry
from aube.shared.schemas import FunctionRecord

log = logging.getLogger(__name__)

# How often the keeper looks at every function even when nothing exited (a claim, a reap, a lost start).
KEEP_INTERVAL = 1.0
# An instance that ends this soon after it was started counts as a failed start for the keeper's backoff.
EARLY_EXIT_SECONDS = 30.0
# Failures further apart than this are not a streak: the backoff starts again from nothing.
FAILURES_FORGOTTEN = 120.0
# Attempts at deleting one exited instance's entry while proxies keep changing it.
DELETE_ATTEMPTS = 5
# Seconds a reported exit with no matching entry is looked for again (see `Upkeep._unmatched`).
UNMATCHED_MEMORY = 30.0
# Seconds the watch is retried after when the runtime cannot be watched (and reconcile covers meanwhile).
WATCH_RETRY = 5.0


class Upkeep:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self._exited: set[str] = set()  # handles reported and not yet handled
        # Handles reported with no entry to match yet, and when: an instance that ends between its health check and
        # the write that records its handle gets its entry a moment after its exit was reported.
        self._unmatched: dict[str, float] = {}
        self._wake = anyio.Event()
        self._topping_up: set[str] = set()  # functions with a top-up under way here
        self._failures: dict[str, tuple[int, float]] = {}  # per function: failures in a streak, the last one's time
        self._hold_until: dict[str, float] = {}
        self._kept: dict[str, float] = {}  # instance ids the keeper started within EARLY_EXIT_SECONDS, when

    def instance_exited(self, handle: str) -> None:
        """The runtime's listener: runs on the event loop, so it only records the handle and wakes `run`."""
        self._exited.add(handle)
        self._wake.set()

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch)
            while True:
                with anyio.move_on_after(KEEP_INTERVAL):
                    await self._wake.wait()
                self._wake = anyio.Event()
                now = time.monotonic()
                reported = {h: at for h, at in self._unmatched.items() if now - at < UNMATCHED_MEMORY}
                reported.update((h, now) for h in self._exited)
                self._exited = set()
                try:
                    if reported:
                        matched = await self.drop_exited(set(reported), tg)
                        reported = {h: at for h, at in reported.items() if h not in matched}
                    self._unmatched = reported
                    await self.keep(tg)
                except Exception:
                    # NATS reconnecting: the next round (and reconcile for the exits) tries again.
                    self._unmatched = reported
                    log.warning("upkeep pass failed", exc_info=True)

    async def _watch(self) -> None:
        while True:
            try:
                await self.cp.runtime.watch_exits(self.cp.owner, self.instance_exited)
            except AubeError as e:
                log.warning("cannot watch instance exits (reconcile still notices them): %s", e)
            except Exception:
                log.exception("watching instance exits failed (reconcile still notices them)")
            await anyio.sleep(WATCH_RETRY)

    # -- exits -------------------------------------------------------------------------------------------------

    async def drop_exited(self, handles: set[str], tg: TaskGroup) -> set[str]:
        """Drop the entries of the instances with these handles; return the handles that had one."""
        entries = await self.cp.registry.instances()
        early: set[str] = set()
        matched: set[str] = set()
        for entry in decisions.exited_entries(
            owner=self.cp.owner, entries=entries, handles=handles, in_flight=self.cp.in_flight
        ):
            matched.add(entry.record.handle)
            state = entry.record.state
            if not await self._delete_exited(entry):
                continue
            r = entry.record
            # Starting and draining instances end because someone stops them (a probe, retirement, the reaper):
            # normal. Free, busy or unhealthy ones died.
            level = logging.DEBUG if state in ("starting", "draining") else logging.WARNING
            log.log(level, "instance %s of %s v%d exited while %s: dropped", r.instance_id, r.function, r.version,
                    state)  # fmt: skip
            if r.instance_id in self._kept:
                early.add(r.function)
            # A starting or draining one is being started or stopped by someone who removes it (or reconcile does).
            if state in ("free", "busy", "unhealthy"):
                self.cp.metrics.stopped("exited")  # the others' stops are counted by whoever stops them
                tg.start_soon(self._remove_leftovers, r.handle)
        # Once per function and round: the keeper's instances of one top-up dying together are one failure.
        for name in early:
            self._failed(name)
        return matched

    async def _delete_exited(self, entry: InstanceEntry | None) -> bool:
        """Delete the entry of an instance that ended, re-reading it after each lost compare-and-set. False if it
        went (or was given to another instance) meanwhile."""
        if entry is None:
            return False
        instance_id = entry.record.instance_id
        for _ in range(DELETE_ATTEMPTS):
            if await self.cp.registry.delete_instance(entry.key, entry.revision):
                return True
            log.debug("exited instance %s changed meanwhile; reading it again", instance_id)
            entry = await self.cp.registry.get_instance(entry.key)
            if entry is None or entry.record.instance_id != instance_id:
                return False
        return False  # still changing: reconcile drops it

    async def _remove_leftovers(self, handle: str) -> None:
        try:
            await self.cp.runtime.stop(handle)
        except Exception as e:  # this task's error must not end the control plane; reconcile tries again
            log.warning("removing exited instance %s failed (reconcile tries again): %s", handle, e)

    # -- min_free ----------------------------------------------------------------------------------------------

    async def keep(self, tg: TaskGroup) -> None:
        self._kept = {i: at for i, at in self._kept.items() if time.time() - at < EARLY_EXIT_SECONDS}
        entries = await self.cp.registry.instances()
        functions = await self.cp.registry.functions()
        self.cp.metrics.observe_registry(self.cp.owner, functions, entries)
        plan = decisions.plan_top_up(
            entries=entries,
            functions=functions,
            runtime=self.cp.runtime.kind,
            skip=self.cp.uploading | self.cp.scaling | self._topping_up,
            hold_until=self._hold_until,
            now=time.time(),
        )
        records = {f.record.name: f.record for f in functions}
        # A deleted function's backoff goes with it (a name uploaded again starts afresh).
        self._failures = {name: v for name, v in self._failures.items() if name in records}
        self._hold_until = {name: t for name, t in self._hold_until.items() if name in records}
        for name, count in plan.items():
            self._topping_up.add(name)
            tg.start_soon(self._top_up, records[name], count)

    async def _top_up(self, fn: FunctionRecord, count: int) -> None:
        try:
            started = await self.cp.start_warm(fn, count)
        except Exception as e:  # this task's error must not end the control plane; the next round tries again
            self._failed(fn.name)
            message = e.message if isinstance(e, AubeError) else f"{type(e).__name__}: {e}"
            log.warning("keeping %s at min_free %d failed: %s", fn.name, fn.manifest.scaling.min_free, message)
        else:
            now = time.time()
            self._kept.update((e.record.instance_id, now) for e in started)
            if started:
                log.info("started %d instance(s) of %s to keep min_free %d", len(started), fn.name,
                         fn.manifest.scaling.min_free)  # fmt: skip
        finally:
            self._topping_up.discard(fn.name)
            self._wake.set()  # look again: another exit may have come while this one started

    def _failed(self, name: str) -> None:
        now = time.time()
        failures, last = self._failures.get(name, (0, now))
        failures = 1 if now - last > FAILURES_FORGOTTEN else failures + 1
        self._failures[name] = (failures, now)
        self._hold_until[name] = now + decisions.hold_after_failures(failures)
