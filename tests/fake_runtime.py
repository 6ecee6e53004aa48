"""An in-memory `Runtime` for fast tests of the control plane's logic (core.py, upkeep.py) on a real nats-server.

An instance is a record plus one tiny real HTTP listener on loopback that answers the health check as the
in-instance server does: 200 with its instance id, only to a request carrying its credential (403 otherwise). So the
control plane's own `wait_healthy` runs unchanged, identity and secret checks included; nothing is patched. The
listener is plain non-blocking sockets driven by the event loop's readers, not an asyncio Server: closing one closes
its connections at once, whatever the loop does next (Python 3.11's Server leaves a connection accepted just before
`close` half made, and its transport is then reported unclosed, an error under the tests' warning policy).

What a test can make happen, on demand:
- a start that fails (`RuntimeFailure`, nothing left behind), an instance that dies before its health check passes,
  one that never becomes healthy, a slow start (`start_gate`);
- an exit of a running instance (`kill`), reported to every `watch_exits` listener at once, as Docker's event stream
  or a pidfd would; a stop is reported as an exit too (real runtimes do), and a watch can be made to fail;
- an instance the registry does not know (`plant`), a failing build.
Every call is recorded in `calls`, in order, so a test can assert what the control plane asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import socket
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import anyio

from aube.controlplane.runtimes.base import (
    Artifact,
    BuildLog,
    ExitListener,
    InstanceSpec,
    Inventory,
    RunningInstance,
    StartedInstance,
)
from aube.shared import names
from aube.shared.errors import BuildFailed, RuntimeFailure
from aube.shared.natsserver import free_port
from aube.shared.schemas import Manifest, RuntimeKind

# What the next start does: serve (healthy at once), fail (start raises), die (start returns, the instance is dead
# before its first health answer), hang (alive, but its health check answers 503 until the control plane gives up).
StartBehaviour = Literal["serve", "fail", "die", "hang"]


@dataclass(frozen=True)
class Call:
    method: str
    args: tuple[object, ...] = ()


@dataclass
class FakeInstance:
    spec: InstanceSpec
    handle: str
    address: str
    alive: bool
    healthy: bool
    listener: HealthListener | None = None

    @property
    def instance_id(self) -> str:
        return self.spec.instance_id


@dataclass
class FakeRuntime:
    kind: RuntimeKind = "process"
    calls: list[Call] = field(default_factory=list)
    instances_by_handle: dict[str, FakeInstance] = field(default_factory=dict)
    artifacts_by_ref: dict[str, Artifact] = field(default_factory=dict)
    # Behaviours of the next starts, in order; once used up, every start serves.
    next_starts: deque[StartBehaviour] = field(default_factory=deque)
    # When set, every start waits for it before it returns: concurrent requests then overlap for certain.
    start_gate: anyio.Event | None = None
    prepare_fails: str | None = None  # the build output of a failing build; None: builds succeed
    watch_fails: bool = False  # watch_exits raises RuntimeFailure (the runtime cannot be watched)
    _listeners: list[tuple[str, ExitListener]] = field(default_factory=list)
    _handles: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _owners: dict[str, str] = field(default_factory=dict)  # artifact ref -> owner

    # -- test controls ---------------------------------------------------------------------------------------------

    def script_starts(self, *behaviours: StartBehaviour) -> None:
        self.next_starts.extend(behaviours)

    def kill(self, handle: str) -> None:
        """The instance ends on its own (crash, OOM, an operator's kill): it stays listed, dead, until stopped."""
        instance = self.instances_by_handle[handle]
        if instance.alive:
            instance.alive = False
            self._close_listener(instance)
            self._report_exit(instance)

    def plant(self, owner: str, function: str, version: int = 1, slot: int = 0, *, alive: bool = True) -> str:
        """An instance carrying `owner`'s labels that no registry entry knows (left by a crashed control plane)."""
        handle = self._new_handle()
        spec = InstanceSpec(
            function=function,
            version=version,
            slot=slot,
            instance_id=f"planted-{handle}",
            artifact="",
            manifest=Manifest(),
            owner=owner,
        )
        self.instances_by_handle[handle] = FakeInstance(spec, handle, "127.0.0.1:1", alive=alive, healthy=alive)
        return handle

    def alive_handles(self) -> set[str]:
        return {h for h, i in self.instances_by_handle.items() if i.alive}

    def called(self, method: str) -> list[tuple[object, ...]]:
        return [c.args for c in self.calls if c.method == method]

    def started_ids(self) -> list[str]:
        """Instance ids of every start that returned an instance (whatever became of it)."""
        return [str(args[0]) for args in self.called("started")]

    # -- the Runtime protocol --------------------------------------------------------------------------------------

    async def prepare(
        self, name: str, version: int, bundle_dir: Path, manifest: Manifest, owner: str, log: BuildLog
    ) -> str:
        self.calls.append(Call("prepare", (name, version)))
        log(f"fake build of {name} v{version}")
        if self.prepare_fails is not None:
            raise BuildFailed(self.prepare_fails)
        ref = f"fake/{owner}/{name}:{version}"
        self.artifacts_by_ref[ref] = Artifact(ref=ref, function=name, version=version)
        self._owners[ref] = owner
        return ref

    async def remove_artifact(self, ref: str) -> None:
        self.calls.append(Call("remove_artifact", (ref,)))
        self.artifacts_by_ref.pop(ref, None)
        self._owners.pop(ref, None)

    async def artifacts(self, owner: str) -> list[Artifact]:
        return [a for ref, a in self.artifacts_by_ref.items() if self._owners.get(ref) == owner]

    async def start(self, spec: InstanceSpec) -> StartedInstance:
        behaviour = self.next_starts.popleft() if self.next_starts else "serve"
        self.calls.append(Call("start", (spec.instance_id, behaviour)))
        if self.start_gate is not None:
            await self.start_gate.wait()
        if behaviour == "fail":
            raise RuntimeFailure(f"fake start of {spec.instance_id} failed")
        handle = self._new_handle()
        instance = FakeInstance(spec, handle, "", alive=behaviour != "die", healthy=behaviour == "serve")
        if behaviour == "die":
            instance.address = f"127.0.0.1:{free_port()}"  # nothing listens there: connections are refused
        else:
            instance.listener = HealthListener(instance, asyncio.get_running_loop())
            instance.address = f"127.0.0.1:{instance.listener.port}"
        self.instances_by_handle[handle] = instance
        self.calls.append(Call("started", (spec.instance_id, handle)))
        if behaviour == "die":
            self._report_exit(instance)
        return StartedInstance(instance_id=spec.instance_id, handle=handle, address=instance.address)

    async def stop(self, handle: str) -> None:
        self.calls.append(Call("stop", (handle,)))
        instance = self.instances_by_handle.pop(handle, None)
        if instance is None:
            return
        self._close_listener(instance)
        if instance.alive:
            instance.alive = False
            self._report_exit(instance)

    async def is_alive(self, handle: str) -> bool:
        instance = self.instances_by_handle.get(handle)
        return instance is not None and instance.alive

    async def instances(self, owner: str) -> list[RunningInstance]:
        return [
            RunningInstance(
                handle=i.handle,
                instance_id=i.instance_id,
                function=i.spec.function,
                version=i.spec.version,
                slot=i.spec.slot,
                alive=i.alive,
            )
            for i in self.instances_by_handle.values()
            if i.spec.owner == owner
        ]

    async def inventory(self, owner: str) -> Inventory:
        return Inventory(instances=await self.instances(owner))  # every fake instance runs on "this machine"

    async def watch_exits(self, owner: str, exited: ExitListener) -> None:
        self.calls.append(Call("watch_exits", (owner,)))
        if self.watch_fails:
            raise RuntimeFailure("fake runtime: exits cannot be watched")
        listener = (owner, exited)
        self._listeners.append(listener)
        try:
            await anyio.sleep_forever()
        finally:
            self._listeners.remove(listener)

    async def close(self) -> None:
        self.calls.append(Call("close"))
        for instance in self.instances_by_handle.values():
            self._close_listener(instance)

    # -- internals -------------------------------------------------------------------------------------------------

    def _new_handle(self) -> str:
        return f"fake-{next(self._handles)}"

    def _report_exit(self, instance: FakeInstance) -> None:
        for owner, exited in list(self._listeners):
            if owner == instance.spec.owner:
                exited(instance.handle)

    @staticmethod
    def _close_listener(instance: FakeInstance) -> None:
        if instance.listener is not None:
            instance.listener.close()
            instance.listener = None


class HealthListener:
    """The in-instance server's health answer on a loopback port: its id to its own credential, 403 to anyone else,
    503 while it is not healthy. Each request is read and answered in the loop's reader callbacks (an answer of a
    few hundred bytes fits a fresh socket's buffer), so there is no task and no transport to outlive `close`."""

    def __init__(self, instance: FakeInstance, loop: asyncio.AbstractEventLoop) -> None:
        self.instance = instance
        self.loop = loop
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.received: dict[socket.socket, bytes] = {}
        loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for conn in list(self.received):
            self._drop(conn)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            self.received[conn] = b""
            self.loop.add_reader(conn.fileno(), self._read, conn)

    def _read(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self.received[conn] += data
            head, found, _ = self.received[conn].partition(b"\r\n\r\n")
            if not found:
                return
            status, body = self.answer(head.decode("latin-1").split("\r\n"))
            payload = json.dumps(body).encode()
            reply = f"HTTP/1.1 {status}\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            with contextlib.suppress(OSError):
                conn.send(reply.encode() + payload)
        self._drop(conn)

    def _drop(self, conn: socket.socket) -> None:
        self.loop.remove_reader(conn.fileno())
        del self.received[conn]
        conn.close()

    def answer(self, lines: list[str]) -> tuple[str, dict[str, object]]:
        instance = self.instance
        headers = dict(_header(line) for line in lines[1:] if ":" in line)
        presented = headers.get(names.HEADER_INSTANCE_SECRET.lower(), "")
        expected = instance.spec.secret
        if lines[0].split(" ")[1:2] != [names.INSTANCE_HEALTH_PATH]:
            return "404 Not Found", {}
        if expected and not hmac.compare_digest(presented.encode(), expected.encode()):
            return "403 Forbidden", {}
        if not instance.healthy or not instance.alive:
            return "503 Service Unavailable", {"status": "starting"}
        return "200 OK", {"status": "ok", "busy": False, "streams_served": 0, "instance": instance.instance_id}


def _header(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name.strip().lower(), value.strip()
