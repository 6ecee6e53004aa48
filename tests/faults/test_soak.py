"""The churn soak (the reliability issue's last acceptance): `aube start` with two proxy replicas on Docker, real
WebSocket clients opening and closing streams for AUBE_SOAK_SECONDS (default 300), and two re-uploads meanwhile.

At the end: no client saw an error; the re-uploads switched versions without cutting a stream (a stream open across
an upload finishes on its old version, streams opened after it get the new one); the registry and the Docker engine
agree, nothing is left busy, the old versions' containers and images are gone; no service restarted; and the
resident memory of every service is flat from the end of the warm-up to the end of the run.

Each figure the test judges is printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from support import AubeStart, wait_http
from websockets.asyncio.client import ClientConnection, connect

from aube.shared import credentials, names
from aube.shared.registry import Registry

SOAK_SECONDS = float(os.environ.get("AUBE_SOAK_SECONDS", "300"))
# Builds and starts of three versions, the settling at the end and the shutdown, on a loaded 2-core machine.
OVERHEAD_SECONDS = 900

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.timeout(SOAK_SECONDS + OVERHEAD_SECONDS),
]

FN = "soak"
SHORT_CLIENTS = 4  # each opens streams back to back: a few messages at once, then close
LONG_CLIENTS = 2  # each keeps streams open for seconds, a message every LONG_INTERVAL
LONG_INTERVAL = 0.3
MIN_FREE = 3
MAX_INSTANCES = 16
WARM_UP_SHARE = 0.2  # the RSS baseline is taken this far into the run
UPLOADS_AT = (0.35, 0.65)  # the re-uploads start this far into the run
SAMPLE_EVERY = 2.0
# A client that opens its stream this long after an upload returned must get the new version: the proxies follow
# the function record by a KV watch (milliseconds), this leaves room for a loaded machine.
SWITCH_LAG = 3.0
SETTLE_WITHIN = 60.0  # after the clients stop: registry and engine agree, nothing busy, old versions gone
SERVICES = ("controlplane", "reaper", "proxy-1", "proxy-2")

# Replies with the upload's marker (a string written into the source per upload) and the version the platform gave
# the instance, so a client sees which upload served it; `streams` proves the instance carries one stream only.
FN_SOURCE = """
import json, os

MARKER = {marker!r}
streams = 0


async def fn(websocket):
    global streams
    streams += 1
    try:
        async for message in websocket:
            reply = {{"marker": MARKER, "version": os.environ.get("AUBE_VERSION"), "streams": streams,
                     "instance": os.environ.get("AUBE_INSTANCE_ID"), "echo": message}}
            await websocket.send(json.dumps(reply))
    finally:
        streams -= 1
"""


@dataclass
class Stream:
    client: str
    began: float  # monotonic, before the connect
    opened: float = 0.0
    closed: float = 0.0
    marker: int = -1  # index of the upload that served it
    version: str = ""  # the version the platform gave the instance that served it
    messages: int = 0


@dataclass
class Upload:
    began: float
    returned: float = 0.0


@dataclass
class Soak:
    markers: list[str]
    started: float = field(default_factory=time.monotonic)
    # Out of the repr: a failure's traceback shows the soak, and thousands of streams would bury it.
    streams: list[Stream] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    samples: list[tuple[float, int, dict[str, int]]] = field(default_factory=list, repr=False)  # t, streams, RSS
    stop: anyio.Event = field(default_factory=anyio.Event)

    def error(self, stream: Stream, what: str) -> None:
        self.errors.append(f"{stream.client} at {stream.began - self.started:.1f}s: {what}")


# -- pure judgements -----------------------------------------------------------------------------------------------


def marker_bounds(began: float, opened: float, uploads: Sequence[Upload]) -> tuple[int, int]:
    """Which uploads (0 the first deploy, i the i-th of `uploads`, the re-uploads) may have served a stream whose
    client began connecting at `began` and was answered at `opened`: at least the last one that had returned
    SWITCH_LAG before, at most the last one begun by then."""
    low = max([i for i, u in enumerate(uploads, 1) if u.returned and u.returned + SWITCH_LAG <= began], default=0)
    high = max([i for i, u in enumerate(uploads, 1) if u.began <= opened], default=0)
    return low, high


def rss_bound_kib(baseline_kib: int) -> int:
    """The RSS growth allowed from the warm-up to the end: 10% + 4 MiB (7-8 MiB for these 32-45 MiB services).

    Measured growth once warm stays under 1.1 MiB (the control plane, which also built two versions; 0.3-0.4 MiB for
    the others): the bound leaves several times that for a slower or busier machine. A proxy replica carries 25-33
    streams/s here, 6,000-8,000 after a 300 s run's warm-up, so a leak of about 1 KiB per stream exceeds the bound
    (the test prints this run's figure); a 2 KiB-per-stream leak put into the proxy grew each replica by 17 MiB."""
    return baseline_kib // 10 + 4 * 1024


def rss_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as e:
        raise AssertionError(f"service process {pid} is gone (it exited during the soak)") from e
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


# -- the parts -----------------------------------------------------------------------------------------------------


async def exchange(soak: Soak, stream: Stream, conn: ClientConnection, text: str) -> None:
    await conn.send(text)
    with anyio.fail_after(30):
        reply = json.loads(await conn.recv())
    marker = soak.markers.index(reply["marker"])
    if reply["echo"] != text or reply["streams"] != 1 or (stream.messages and marker != stream.marker):
        raise AssertionError(f"bad reply {reply} to {text!r} (stream served by upload {stream.marker})")
    stream.marker, stream.version = marker, str(reply["version"])
    stream.messages += 1


async def one_stream(
    soak: Soak, url: str, name: str, rng: random.Random, *, long: bool, until: anyio.Event | None = None
) -> None:
    """Open a stream, exchange messages (a few at once, or for seconds, or until `until`), close it; any failure is a
    client error."""
    stream = Stream(name, time.monotonic())
    count = rng.randint(1, 4) if not long else 1_000_000
    lasts = rng.uniform(3, 20) if until is None else float("inf")
    try:
        async with connect(url, proxy=None, open_timeout=30, close_timeout=10) as conn:
            stream.opened = time.monotonic()
            for i in range(count):
                await exchange(soak, stream, conn, f"{name}-{len(soak.streams)}-{i}")
                if long:
                    if (until is not None and until.is_set()) or time.monotonic() - stream.opened > lasts:
                        break
                    await anyio.sleep(LONG_INTERVAL)
        stream.closed = time.monotonic()
        soak.streams.append(stream)
    except Exception as e:
        soak.error(stream, f"{type(e).__name__}: {e}")
        await anyio.sleep(0.5)


async def client(soak: Soak, url: str, index: int, *, long: bool) -> None:
    rng = random.Random(index)
    while not soak.stop.is_set():
        await one_stream(soak, url, f"{'long' if long else 'short'}-{index}", rng, long=long)
        await anyio.sleep(rng.uniform(0, 0.05))


def write_function(folder: Path, marker: str) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "fn.py").write_text(FN_SOURCE.format(marker=marker))
    (folder / "aube.toml").write_text(f"[scaling]\nmin_free = {MIN_FREE}\nmax_instances = {MAX_INSTANCES}\n")


async def deploy(start: AubeStart, folder: Path, *, wait_for_controlplane: bool = False) -> None:
    """`aube deploy` as a deployer runs it; at the platform's start, until the control plane answers."""
    env = {**start.env, "AUBE_CREDENTIALS": str(start.workdir / ".data/credentials.env")}
    argv = [sys.executable, "-m", "aube.cli", "deploy", str(folder), FN]
    with anyio.fail_after(600):
        while True:
            done = await anyio.run_process(argv, env=env, cwd=start.workdir, check=False)
            if not (wait_for_controlplane and b"no service is answering" in done.stderr):
                break
            await anyio.sleep(0.5)
    assert done.returncode == 0, done.stderr.decode(errors="replace")


async def reuploads(soak: Soak, start: AubeStart, folder: Path, url: str) -> None:
    """The two re-uploads, each while a stream it must not cut is open (and however many the clients have)."""
    for share, marker in zip(UPLOADS_AT, soak.markers[1:], strict=True):
        await anyio.sleep(max(0.0, soak.started + share * SOAK_SECONDS - time.monotonic()))
        write_function(folder, marker)
        across = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(one_stream, soak, url, f"across-{marker}", random.Random(), long=True, until=across))
            await anyio.sleep(1)  # the stream is open before the upload begins
            upload = Upload(time.monotonic())
            await deploy(start, folder)
            upload.returned = time.monotonic()
            soak.uploads.append(upload)
            await anyio.sleep(2)
            across.set()


async def sample_rss(soak: Soak, pids: dict[str, int]) -> None:
    while not soak.stop.is_set():
        rss = {label: rss_kib(pid) for label, pid in pids.items()}
        soak.samples.append((time.monotonic() - soak.started, len(soak.streams), rss))
        with anyio.move_on_after(SAMPLE_EVERY):
            await soak.stop.wait()


def claimed_per_replica(start: AubeStart) -> list[int]:
    """Each replica's claims won for the function (its /_aube/metrics): the streams it carried."""
    counts = []
    for replica in range(2):
        with urllib.request.urlopen(f"http://127.0.0.1:{start.operator_base + replica}/_aube/metrics", timeout=5) as r:
            text = r.read().decode()
        wanted = f'aube_claims_total{{function="{FN}",result="claimed"}} '
        counts.append(sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted)))
    return counts


def disagreement(owner: str, current: int, entries: Sequence[Any], docker_client: Any) -> list[str]:
    """What keeps the registry and the engine from agreeing at rest (empty when they do)."""
    problems = []
    containers = docker_client.api.containers(all=True, filters={"label": f"{names.LABEL_OWNER}={owner}"})
    running = {c["Id"]: c for c in containers if c["State"] == "running"}
    handles = {e.record.handle for e in entries}
    for e in entries:
        r = e.record
        if r.state != "free" or r.version != current or r.handle not in running:
            problems.append(f"entry {e.key}: {r.state} v{r.version} container running: {r.handle in running}")
    for c in containers:
        labels = c.get("Labels") or {}
        if c["Id"] not in handles or c["State"] != "running" or labels.get(names.LABEL_VERSION) != str(current):
            known = "its entry" if c["Id"] in handles else "no entry"
            problems.append(f"container {c['Names']} {c['State']} v{labels.get(names.LABEL_VERSION)}, {known}")
    images = docker_client.api.images(filters={"label": f"{names.LABEL_OWNER}={owner}"})
    tags = sorted(t for image in images for t in image.get("RepoTags") or [image["Id"]])
    if tags != [names.image_tag(owner, FN, current)]:
        problems.append(f"images {tags}, wanted only v{current}'s")
    return problems


# -- the soak ------------------------------------------------------------------------------------------------------


async def churn(soak: Soak, start: AubeStart, folder: Path, pids: dict[str, int]) -> None:
    """The clients, the RSS sampler and the re-uploads, for SOAK_SECONDS (or until both uploads are done)."""
    url = f"ws://127.0.0.1:{start.proxy_port}/{FN}"
    soak.started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(sample_rss, soak, pids)
        for i in range(SHORT_CLIENTS + LONG_CLIENTS):
            tg.start_soon(partial(client, soak, url, i, long=i >= SHORT_CLIENTS))
        await reuploads(soak, start, folder, url)
        await anyio.sleep(max(0.0, soak.started + SOAK_SECONDS - time.monotonic()))
        soak.stop.set()  # each client finishes its stream; the sampler takes its last sample


def check_clients(soak: Soak) -> None:
    """No error; every stream served by an upload that was live when it began; each re-upload seen switching."""
    print(f"client errors: {len(soak.errors)}", *soak.errors[:20], sep="\n  ")
    assert not soak.errors
    assert len(soak.uploads) == 2
    for stream in soak.streams:
        low, high = marker_bounds(stream.began, stream.opened, soak.uploads)
        assert low <= stream.marker <= high, (stream, soak.uploads)
    # Each upload is one version of the platform's, the next one each time.
    versions = {(s.marker, s.version) for s in soak.streams}
    first = int(min(versions)[1])
    assert versions == {(i, str(first + i)) for i in range(3)}, versions
    for i, upload in enumerate(soak.uploads, 1):
        across = [s for s in soak.streams if s.opened < upload.began and s.closed > upload.returned]
        after = [s for s in soak.streams if s.marker == i]
        last_old = max(s.began for s in soak.streams if s.marker < i) - upload.returned
        print(
            f"re-upload {i}: took {upload.returned - upload.began:.1f}s; {len(across)} stream(s) open across it"
            f" finished on the old version; {len(after)} streams on the new one; the last stream served by an older"
            f" one began {last_old:+.2f}s from its return"
        )
        assert across and all(s.marker == i - 1 for s in across)
        assert after


def check_rss(soak: Soak, rss_end: dict[str, int], per_replica: Sequence[int]) -> None:
    warm = next(s for s in soak.samples if s[0] >= WARM_UP_SHARE * SOAK_SECONDS)
    print(f"RSS (KiB) at {warm[0]:.0f}s ({warm[1]} streams done) and at the end ({len(soak.streams)} streams):")
    for label in SERVICES:
        base, end = warm[2][label], rss_end[label]
        trail = " ".join(str(s[2][label]) for s in soak.samples[:: max(1, len(soak.samples) // 12)])
        print(f"  {label:12} {base} -> {end} ({end - base:+d}, bound {rss_bound_kib(base)})  samples: {trail}")
    # The replicas' share of the streams after the warm-up, from their claim counts over the whole run.
    measured = (len(soak.streams) - warm[1]) * min(per_replica) // max(1, sum(per_replica))
    catches = rss_bound_kib(warm[2]["proxy-1"]) / max(1, measured)
    print(
        f"about {measured} streams per replica after the warm-up: the bound catches a leak of {catches:.1f} KiB/stream"
    )
    for label in SERVICES:
        assert rss_end[label] - warm[2][label] < rss_bound_kib(warm[2][label]), label


async def settle(registry: Registry, owner: str, current: int, docker_client: Any) -> None:
    """Wait (boundedly) for the registry and the engine to agree at rest: every entry free, of the current version,
    with a running container; every container of this owner in the registry; only the current image."""
    began = time.monotonic()
    while True:
        entries = [e for e in await registry.instances() if e.record.owner == owner]
        problems = disagreement(owner, current, entries, docker_client)
        if not problems or time.monotonic() - began > SETTLE_WITHIN:
            break
        await anyio.sleep(0.5)
    print(f"registry and engine agree {time.monotonic() - began:.1f}s after the clients stopped: {len(entries)} free"
          f" instances of v{current}", *problems, sep="\n  ")  # fmt: skip
    assert not problems


@pytest.mark.parametrize("runtime_kind", ["docker"], indirect=True)
async def test_churn_with_two_reuploads_has_no_error_leaves_registry_and_engine_agreeing_and_flat_rss(
    platform, docker_client: Any, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    soak = Soak(markers=[f"upload-{i}-{random.getrandbits(32):08x}" for i in range(3)])
    start = AubeStart(tmp_path, platform.env(), proxies=2)
    try:
        await wait_http(start.proxy_port)
        folder = tmp_path / FN
        write_function(folder, soak.markers[0])
        await deploy(start, folder, wait_for_controlplane=True)
        pids = {label: start.pids(label)[0] for label in SERVICES}
        await churn(soak, start, folder, pids)
        ran = time.monotonic() - soak.started
        rss_end = {label: rss_kib(pid) for label, pid in pids.items()}
        per_replica = claimed_per_replica(start)
        clients = SHORT_CLIENTS + LONG_CLIENTS
        print(f"soak: {len(soak.streams)} streams in {ran:.0f}s by {clients} clients; per replica {per_replica}")

        check_clients(soak)
        for label in SERVICES:
            assert start.pids(label) == [pids[label]], f"{label} restarted: {start.output()[-3000:]}"
        login = credentials.platform_secrets(tmp_path / ".data").service_login("controlplane")
        nc = await nats.connect(start.env["AUBE_NATS_URL"], user=login.user, password=login.password)
        try:
            registry = await Registry.open(nc.jetstream())
            fn = await registry.get_function(FN)
            assert fn is not None
            await settle(registry, platform.owner, fn.record.version, docker_client)
        finally:
            await nc.close()
        check_rss(soak, rss_end, per_replica)
        assert start.interrupt() == 0
    finally:
        start.close()
