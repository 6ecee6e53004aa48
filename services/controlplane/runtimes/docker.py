"""The production runtime: one hardened Docker container per instance, one image per function version.

Owns everything Aube does with the Docker SDK. The SDK blocks, so each call runs in a worker thread under a
CapacityLimiter (builds under their own, so a long build never holds up start/stop), bounded by the client's
HTTP timeout (`docker_timeout`; builds use a second client with `build_timeout`). Docker's exceptions are
translated here (RuntimeFailure, BuildFailed for builds) and results are returned as our Structs.

A container is hardened as docker_spec.py says. It joins the instance network (`instancenet`): no traffic to other
containers, and no new connection to the host; `connect` refuses to return a runtime whose network or host firewall
is not in place (unless the operator turned the firewall off). Starts take turns (`docker_start_concurrency`).

Exits are followed on the engine's event stream (`watch_exits`): a worker thread of its own reads the `die`
events of the owner's containers and hands each container id to the event loop; a broken stream is opened again,
from the time the last one started (the engine replays what was missed; a repeated exit is harmless).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.to_thread
import docker
import docker.errors
import requests.exceptions

from aube.controlplane.runtimes import deps, docker_spec, handoffdir, images, instancenet
from aube.controlplane.runtimes.base import (
    Artifact,
    BuildLog,
    ExitListener,
    InstanceSpec,
    Inventory,
    RunningInstance,
    StartedInstance,
)
from aube.controlplane.runtimes.docker_output import DockerOutput
from aube.controlplane.runtimes.output import OutputSink
from aube.shared import names
from aube.shared.errors import AubeError, BuildFailed, RuntimeFailure
from aube.shared.schemas import Manifest, RuntimeKind
from aube.shared.settings import ControlPlaneSettings

logger = logging.getLogger(__name__)

T = TypeVar("T")

_DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)
# The container events that mean its instance ended ("die" comes for every end: exit, kill, OOM, removal by force).
EXIT_EVENTS = ("die",)
# Seconds between attempts to follow the engine's events again after the stream broke.
EVENTS_RETRY = 1.0


class DockerRuntime:
    kind: RuntimeKind = "docker"

    def __init__(self, settings: ControlPlaneSettings, client: Any, build_client: Any) -> None:
        self._settings = settings
        self._client = client
        self._build_client = build_client
        # urllib3 keeps 10 connections per client; stay below so no call waits for a connection.
        self._limiter = anyio.CapacityLimiter(8)
        self._build_limiter = anyio.CapacityLimiter(2)
        # Container starts in progress at once (`start`); a waiting start keeps its "starting" registry entry.
        self._start_turns = anyio.Semaphore(settings.docker_start_concurrency)
        self._init_supported = True
        # Instances' handoff folders (handoffdir.py), apart from the process runtime's socket folders.
        data_runs = Path(settings.data_dir).absolute() / "run-docker"
        root_runs = Path("/run/aube-docker") if os.geteuid() == 0 else data_runs
        self._runs = Path(settings.socket_dir).absolute() / "docker" if settings.socket_dir else root_runs
        # The event stream holds a worker thread and a connection for as long as it is followed.
        self._events_limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def connect(cls, settings: ControlPlaneSettings) -> DockerRuntime:
        """Connect to the engine named by DOCKER_HOST (or the local socket); RuntimeFailure if none answers."""

        def _connect() -> tuple[Any, Any]:
            client = docker.from_env(timeout=max(1, round(settings.docker_timeout)))
            try:
                client.ping()
                network, bridge = settings.instance_network, settings.instance_bridge
                instancenet.ensure(client, network, bridge, settings.instance_firewall)
                if not settings.instance_firewall:
                    logger.warning(
                        "AUBE_INSTANCE_FIREWALL is off: instances on bridge %s can open connections to every port "
                        "listening on this host (NATS, the proxy, ...) unless the operator's own firewall closes it",
                        settings.instance_bridge,
                    )
                build_client = docker.from_env(timeout=max(1, round(settings.build_timeout)))
            except BaseException:
                client.close()
                raise
            return client, build_client

        try:
            client, build_client = await anyio.to_thread.run_sync(_connect)
        except instancenet.FirewallError as e:
            raise instancenet.FirewallError(
                f"cannot close the host to instances: {e.message}. Run the control plane as root with iptables, or "
                "set AUBE_INSTANCE_FIREWALL=off and close the bridge's input yourself (docs/security.md)"
            ) from e
        except _DOCKER_ERRORS as e:
            raise RuntimeFailure(f"no Docker engine answers: {e}") from e
        return cls(settings, client, build_client)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._client.close, limiter=self._limiter)
        await anyio.to_thread.run_sync(self._build_client.close, limiter=self._build_limiter)

    # -----------------------------------------------------------------------------------------------------
    # Calling the SDK

    async def _call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one SDK call in a worker thread; Docker errors become RuntimeFailure naming `what`."""
        try:
            return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._limiter)
        except docker.errors.NotFound:
            raise
        except _DOCKER_ERRORS as e:
            raise RuntimeFailure(f"docker: {what} failed: {docker_spec.explain(e)}") from e

    async def _build(self, fn: Callable[[BuildLog], T], log: BuildLog) -> T:
        """Run a blocking build step in a worker thread; its log lines are handed back to the event loop."""

        def thread_log(line: str) -> None:
            anyio.from_thread.run_sync(log, line)

        try:
            return await anyio.to_thread.run_sync(fn, thread_log, limiter=self._build_limiter)
        except AubeError:
            raise
        except _DOCKER_ERRORS as e:
            raise BuildFailed(f"docker: image build failed: {docker_spec.explain(e)}") from e

    # -----------------------------------------------------------------------------------------------------
    # Images

    async def ensure_images(self, log: BuildLog) -> str:
        """Make sure the base and runtime images exist (building them when missing); return the runtime tag.

        `prepare` does this too; calling it at startup moves the first build out of the first upload.
        """
        return await self._build(
            lambda tlog: images.ensure_runtime_image(self._build_client, self._settings, tlog), log
        )

    async def prepare(
        self, name: str, version: int, bundle_dir: Path, manifest: Manifest, owner: str, log: BuildLog
    ) -> str:
        runtime_tag = await self.ensure_images(log)
        tag = names.image_tag(owner, name, version)
        labels = {
            names.LABEL_MANAGED: "true",
            names.LABEL_OWNER: owner,
            names.LABEL_FUNCTION: name,
            names.LABEL_VERSION: str(version),
        }
        with tempfile.TemporaryDirectory(prefix="aube-build-") as tmp:
            context = Path(tmp)
            await deps.install_requirements(
                bundle_dir / "requirements.txt",
                context / images.CONTEXT_DIR / "deps",
                Path(self._settings.data_dir) / "cache",
                log,
                self._settings.build_timeout,
            )

            def fill_context() -> None:
                shutil.copytree(bundle_dir, context / images.CONTEXT_DIR / "fn", symlinks=True)
                images.normalize_modes(context)
                # Labels come first, so even the intermediate images of a failed build carry the owner's
                # labels and are found (and removed) by them.
                label_line = " ".join(f"{k}={json.dumps(v)}" for k, v in labels.items())
                (context / "Dockerfile").write_text(
                    f"FROM {runtime_tag}\nLABEL {label_line}\nCOPY {images.CONTEXT_DIR}/ {images.AUBE_DIR}/\n"
                )
                (context / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")

            await anyio.to_thread.run_sync(fill_context)
            filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
            log(f"building image {tag}")
            await self._build(
                lambda tlog: images.build_image(
                    self._build_client,
                    context,
                    tag,
                    tlog,
                    self._settings.build_timeout,
                    failure_filters=filters,
                ),
                log,
            )
        return tag

    async def remove_artifact(self, ref: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            await self._call(f"removing image {ref}", self._client.api.remove_image, ref, force=True)

    async def artifacts(self, owner: str) -> list[Artifact]:
        found = await self._call(
            "listing images",
            self._client.api.images,
            filters={"label": [f"{names.LABEL_MANAGED}=true", f"{names.LABEL_OWNER}={owner}"]},
        )
        result = []
        for image in found:
            labels = image.get("Labels") or {}
            function = labels.get(names.LABEL_FUNCTION, "")
            version = docker_spec.label_int(labels.get(names.LABEL_VERSION))
            tags = [t for t in image.get("RepoTags") or [] if t != "<none>:<none>"]
            # An untagged one is a leftover (an interrupted build); listing it by id lets it be removed.
            for ref in tags or [image["Id"]]:
                result.append(Artifact(ref=ref, function=function, version=version))
        return result

    # -----------------------------------------------------------------------------------------------------
    # Instances

    async def start(self, spec: InstanceSpec) -> StartedInstance:
        api, s = self._client.api, self._settings
        # Where a proxy of this host hands the instance clients' own sockets (handoffdir.py).
        handoff = self._runs / spec.owner / spec.instance_id
        uid, gid = (int(part) for part in images.NOBODY.split(":"))
        await anyio.to_thread.run_sync(handoffdir.make, handoff, uid, gid)
        try:
            options = docker_spec.host_config_options(spec.manifest.limits, s, handoff, init=self._init_supported)
            host_config = api.create_host_config(**options)
        except (ValueError, docker.errors.DockerException) as e:  # e.g. an unparseable memory limit
            raise RuntimeFailure(f"invalid container limits for {spec.function}: {e}") from e
        name = names.container_name(spec.owner, spec.function, spec.instance_id)
        create = functools.partial(
            api.create_container, spec.artifact, **docker_spec.container_options(spec, name, host_config)
        )
        # Starts take turns (`docker_start_concurrency` at once): the engine serialises much of each (bench/NOTES.md,
        # "Parallel Docker starts") and the servers' interpreters share the CPUs, so a burst's unbounded parallel
        # starts made every one of them slow; in turns the first instances are up early and the last no later. A turn
        # lasts until the server listens (docker_spec.SERVER_WAIT_IN_TURN at most); its health check is the caller's.
        queued = time.monotonic()
        turn = contextlib.AsyncExitStack()
        async with turn:
            await turn.enter_async_context(self._start_turns)
            began = time.monotonic()
            created = await self._create_and_start(spec, name, create)
            if created is None:  # the engine cannot run --init: again, without it (and with a turn of its own)
                await turn.aclose()
                return await self.start(spec)
            handle, port = created
            in_engine = time.monotonic() - began
            try:
                await self._until_listening(handle, handoff)
                await turn.aclose()  # the next start's turn; this one's server may still be on its way
                handoff_socket = await anyio.to_thread.run_sync(handoffdir.lock, handoff, s.health_timeout)
            except BaseException:
                with anyio.move_on_after(s.docker_timeout, shield=True):
                    await self._remove(handle)
                raise
        times = (began - queued, in_engine, time.monotonic() - began - in_engine)
        logger.info(
            "started %s (%s) on port %s: %.1fs for its turn, %.1fs in the engine, %.1fs to listen",
            name,
            handle[:12],
            port,
            *times,
        )
        address = f"{s.advertise_host}:{port}"
        return StartedInstance(instance_id=spec.instance_id, handle=handle, address=address, handoff=handoff_socket)

    async def _until_listening(self, handle: str, handoff: Path) -> None:
        """Until the container's server listens, its container ended (checked every second: a function that dies at
        once gives its turn back at once) or docker_spec.SERVER_WAIT_IN_TURN passed."""
        deadline = anyio.current_time() + min(docker_spec.SERVER_WAIT_IN_TURN, self._settings.health_timeout)
        while (left := deadline - anyio.current_time()) > 0:
            if await anyio.to_thread.run_sync(handoffdir.wait_listening, handoff, min(1.0, left)):
                return
            if not await self.is_alive(handle):
                return

    async def _create_and_start(
        self, spec: InstanceSpec, name: str, create: Callable[[], Any]
    ) -> tuple[str, int] | None:
        """Create and start the container: its handle and published port, or None when it must be started again
        without --init (the engine has no docker-init); a container that cannot run is removed."""
        s = self._settings
        # A few listings (about 10 ms): worth it so that no instance ever starts on a network left open.
        await self._call(
            "checking the instance network",
            instancenet.ensure,
            self._client,
            s.instance_network,
            s.instance_bridge,
            s.instance_firewall,
        )
        try:
            created = await self._call(f"creating container {name}", create)
        except docker.errors.NotFound as e:
            raise RuntimeFailure(f"image {spec.artifact} does not exist: prepare it first") from e
        handle = str(created["Id"])
        try:
            try:
                await self._call(f"starting container {name}", self._client.api.start, handle)
            except RuntimeFailure as e:
                if not (self._init_supported and "docker-init" in str(e)):
                    raise
                # An engine without docker-init: start the next ones without it, and this one again.
                logger.warning("the Docker engine cannot run --init; starting instances without it: %s", e)
                self._init_supported = False
                await self._remove(handle)
                return None
            return handle, await self._published_port(name, handle)
        except BaseException:
            with anyio.move_on_after(s.docker_timeout, shield=True):
                await self._remove(handle)
            raise

    async def _published_port(self, name: str, handle: str) -> int:
        """The host port Docker picked for the instance port; RuntimeFailure (with the logs) if there is none."""
        info = await self._call(f"inspecting container {name}", self._client.api.inspect_container, handle)
        port = docker_spec.published_port(info)
        if port is not None:
            return port
        state = info.get("State") or {}
        logs = await self._call(f"reading logs of {name}", self._client.api.logs, handle, tail=20)
        text = logs.decode(errors="replace").strip() if isinstance(logs, bytes) else str(logs)
        raise RuntimeFailure(
            f"container {name} has no published port (state {state.get('Status')!r}, exit "
            f"{state.get('ExitCode')}):\n{text[-2000:]}"
        )

    async def _remove(self, handle: str) -> None:
        try:
            info = await self._call(f"inspecting container {handle[:12]}", self._client.api.inspect_container, handle)
            labels = (info.get("Config") or {}).get("Labels") or {}
            await self._call(f"removing container {handle[:12]}", self._client.api.remove_container, handle, force=True)
            owner, instance_id = labels.get(names.LABEL_OWNER, ""), labels.get(names.LABEL_INSTANCE, "")
            if owner and instance_id and "/" not in owner + instance_id and ".." not in owner + instance_id:
                await anyio.to_thread.run_sync(handoffdir.remove, self._runs / owner / instance_id)
        except docker.errors.NotFound:
            pass
        except RuntimeFailure as e:
            if "already in progress" not in str(e):
                raise

    async def stop(self, handle: str) -> None:
        try:
            # SIGTERM first: the in-instance server closes its stream with 1001 before SIGKILL.
            await self._call(
                f"stopping container {handle[:12]}", self._client.api.stop, handle, timeout=docker_spec.STOP_GRACE
            )
        except docker.errors.NotFound:
            return
        except RuntimeFailure as e:
            logger.warning("stopping %s failed, removing it by force: %s", handle[:12], e)
        await self._remove(handle)

    async def is_alive(self, handle: str) -> bool:
        try:
            info = await self._call(f"inspecting container {handle[:12]}", self._client.api.inspect_container, handle)
        except docker.errors.NotFound:
            return False
        state = info.get("State") or {}
        return bool(state.get("Running")) and not state.get("Restarting") and not state.get("Dead")

    async def inventory(self, owner: str) -> Inventory:
        return Inventory(instances=await self.instances(owner))  # this machine's instances only

    async def instances(self, owner: str) -> list[RunningInstance]:
        found = await self._call(
            "listing containers",
            self._client.api.containers,
            all=True,
            filters={"label": [f"{names.LABEL_MANAGED}=true", f"{names.LABEL_OWNER}={owner}"]},
        )
        result = []
        for c in found:
            labels = c.get("Labels") or {}
            # Unreadable labels become -1 rather than hiding the container: reconcile then sees a container
            # with no registry entry and removes it.
            result.append(
                RunningInstance(
                    handle=str(c["Id"]),
                    instance_id=labels.get(names.LABEL_INSTANCE, ""),
                    function=labels.get(names.LABEL_FUNCTION, ""),
                    version=docker_spec.label_int(labels.get(names.LABEL_VERSION)),
                    slot=docker_spec.label_int(labels.get(names.LABEL_SLOT)),
                    alive=c.get("State") == "running",
                )
            )
        return result

    async def watch_output(self, owner: str, sink: OutputSink) -> None:
        """Ship what the owner's containers write (docker_output.py) until cancelled."""
        await DockerOutput(owner, sink, self._settings.log_rate, self._settings.log_burst).watch()

    async def watch_exits(self, owner: str, exited: ExitListener) -> None:
        since: int | None = None
        while True:
            opened_at = int(time.time())
            try:
                await self._follow_exits(owner, exited, since)
            except RuntimeFailure as e:
                logger.warning("following the engine's container events failed, again in %gs: %s", EVENTS_RETRY, e)
            else:
                logger.warning("the engine ended its event stream; following it again in %gs", EVENTS_RETRY)
            since = opened_at
            await anyio.sleep(EVENTS_RETRY)

    async def _follow_exits(self, owner: str, exited: ExitListener, since: int | None) -> None:
        filters = {"type": ["container"], "event": list(EXIT_EVENTS), "label": [f"{names.LABEL_OWNER}={owner}"]}
        events = self._client.api.events
        stream = await self._call("following events", events, since=since, decode=True, filters=filters)

        def pump() -> None:
            # Runs until the stream ends or breaks, which `stream.close()` below also causes.
            try:
                for event in stream:
                    handle = (event.get("Actor") or {}).get("ID") or event.get("id")
                    if isinstance(handle, str) and event.get("Action", event.get("status")) in EXIT_EVENTS:
                        anyio.from_thread.run_sync(exited, handle)
            except _DOCKER_ERRORS as e:
                raise RuntimeFailure(f"docker: the event stream broke: {docker_spec.explain(e)}") from e
            except (OSError, ValueError, AttributeError) as e:  # the socket closed under the reader
                raise RuntimeFailure(f"docker: the event stream broke: {e}") from e

        try:
            # abandon_on_cancel: the thread blocks in a read; cancelling returns at once and closing the stream
            # (below) ends the read, so the abandoned thread finishes too.
            await anyio.to_thread.run_sync(pump, limiter=self._events_limiter, abandon_on_cancel=True)
        finally:
            with contextlib.suppress(Exception):
                stream.close()
