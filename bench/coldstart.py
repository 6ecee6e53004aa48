"""Cold start scenarios: a scale request to the first echo on the new instance, against bare starts of the same
server (process and Docker) and of `python -c pass` (bench/README.md, "Cold start")."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
from common import CREDENTIALS, ECHO, PY, Settings, Stack, first_echo, log, manifest, median, rotate, upload, wait_until
from harness import http_status

from aube.shared import names
from aube.shared.bus import request
from aube.shared.natsserver import free_port
from aube.shared.schemas import ScaleReply, ScaleRequest, StopInstanceReply, StopInstanceRequest


async def aube_cold_start(stack: Stack, name: str) -> dict[str, float]:
    """Scale request -> reply (instance healthy and free) -> first echo on it; then stop it again."""
    async with stack.client() as (nc, registry):
        t0 = time.perf_counter()
        reply = await request(nc, names.SUBJECT_SCALE, ScaleRequest(name=name, count=1), ScaleReply, 120)
        t_reply = time.perf_counter()
        started = reply.started[0]
        # The credential, which a proxy has from its registry watch without asking: not part of the timing.
        looked_up = time.perf_counter()
        entry = await registry.get_instance(names.instance_key(name, started.slot))
        address = started.address
        if entry is not None:
            address = entry.record.address  # a reply shows a Unix socket as "unix" only; the registry has its path
            if entry.record.secret:
                CREDENTIALS[address] = entry.record.secret
        lookup_s = time.perf_counter() - looked_up
        first_echo(address)
        t_echo = time.perf_counter()
        await request(
            nc,
            names.SUBJECT_STOP_INSTANCE,
            StopInstanceRequest(name=name, slot=started.slot, instance_id=started.instance_id, reason="bench"),
            StopInstanceReply,
            60,
        )
    return {"total_s": t_echo - t0 - lookup_s, "scale_reply_s": t_reply - t0}


def bare_process_start(work: Path) -> dict[str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUBE_")}
    env.update(
        AUBE_FN_DIR=str(ECHO),
        AUBE_INSTANCE_HOST="127.0.0.1",
        AUBE_INSTANCE_PORT=str(port),
        AUBE_FUNCTION="echo",
        AUBE_INSTANCE_ID="bare",
        AUBE_VERSION="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    with (work / "bare-process.log").open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([PY, "-m", "aube.instance"], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            up = wait_until(lambda: http_status("127.0.0.1", port, names.INSTANCE_HEALTH_PATH) == 200, 60, "bare")
            first_echo(f"127.0.0.1:{port}")
            echo = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
    return {"port_s": up, "echo_s": echo}


def bare_docker_start(client: Any, image: str, owner: str) -> dict[str, float]:
    """`docker run -d -p 127.0.0.1:<port>:8080 <image>` through the Engine API, until the port answers."""
    port = free_port()
    env = {
        "AUBE_INSTANCE_ID": "bare",
        "AUBE_FUNCTION": "cold",
        "AUBE_VERSION": "1",
        "AUBE_INSTANCE_PORT": "8080",
    }
    t0 = time.perf_counter()
    container = client.containers.run(
        image,
        detach=True,
        environment=env,
        ports={"8080/tcp": ("127.0.0.1", port)},
        labels={names.LABEL_OWNER: owner, "aube.bench": "bare"},
    )
    try:
        up = wait_until(lambda: http_status("127.0.0.1", port, names.INSTANCE_HEALTH_PATH) == 200, 60, "docker run")
        first_echo(f"127.0.0.1:{port}")
        echo = time.perf_counter() - t0
    finally:
        container.remove(force=True)
    return {"port_s": up, "echo_s": echo}


def bare_python_start() -> float:
    """`python -c pass`: the interpreter's own floor, which no fresh process can go under."""
    t0 = time.perf_counter()
    subprocess.run([PY, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def scenario_cold_process(s: Settings, stacks: list[Stack], work: Path) -> list[dict[str, Any]]:
    """Process cold start with each stack's settings (with and without a zygote), interleaved with the two floors:
    the bare instance server until its port answers, and a bare `python -c pass`."""
    log(f"cold start on {', '.join(st.label for st in stacks)}")
    for stack in stacks:
        anyio.run(upload, stack, "cold", manifest(0, 4))
    aube: dict[str, list[dict[str, float]]] = {st.label: [] for st in stacks}
    bare: list[dict[str, float]] = []
    python: list[float] = []
    for rep in range(s.cold_reps):
        for config in rotate([*aube, "bare", "python"], rep):
            if config == "bare":
                bare.append(bare_process_start(work))
            elif config == "python":
                python.append(bare_python_start())
            else:
                stack = next(st for st in stacks if st.label == config)
                aube[config].append(anyio.run(aube_cold_start, stack, "cold"))
    floor_s, python_s = median([r["port_s"] for r in bare]), median(python)
    results = []
    for label, samples in aube.items():
        aube_s = median([r["total_s"] for r in samples])
        results.append(
            {
                "runtime": label,
                "aube_s": aube_s,
                "ratio": aube_s / floor_s,
                "aube_scale_reply_s": median([r["scale_reply_s"] for r in samples]),
                "floor_port_s": floor_s,
                "floor_echo_s": median([r["echo_s"] for r in bare]),
                "python_s": python_s,
                "ratio_python": aube_s / python_s,
                "aube_samples_s": [r["total_s"] for r in samples],
                "floor_samples_s": [r["port_s"] for r in bare],
                "python_samples_s": python,
            }
        )
        log(f"  {results[-1]}")
    return results


def cold_process(s: Settings, work: Path, owner: str, stop: ExitStack) -> list[dict[str, Any]]:
    """Process cold start in bubblewrap (the default wherever it works; the zygote exists for sandboxed instances
    only), with the zygote and without, each on a platform and owner of its own."""
    stacks = [
        Stack(work, "process", f"{owner}z", stop, "process sandboxed (zygote)", AUBE_SANDBOX="bwrap"),
        Stack(
            work, "process", f"{owner}f", stop, "process sandboxed (no zygote)", AUBE_SANDBOX="bwrap", AUBE_ZYGOTE="off"
        ),
    ]
    for stack in stacks:
        anyio.run(stack.wait_ready)
    return scenario_cold_process(s, stacks, work)


def scenario_cold(s: Settings, stack: Stack, work: Path, docker_client: Any = None) -> dict[str, Any]:
    runtime = stack.runtime
    log(f"cold start on {runtime}")
    anyio.run(upload, stack, "cold", manifest(0, 4))
    image = ""
    if runtime == "docker":

        async def version() -> int:
            async with stack.client() as (_, registry):
                fn = await registry.get_function("cold")
                assert fn is not None
                return int(fn.record.version)

        image = names.image_tag(stack.owner, "cold", anyio.run(version))
    aube: list[dict[str, float]] = []
    bare: list[dict[str, float]] = []
    for rep in range(s.cold_reps):
        for config in rotate(["aube", "bare"], rep):
            if config == "aube":
                aube.append(anyio.run(aube_cold_start, stack, "cold"))
            elif runtime == "process":
                bare.append(bare_process_start(work))
            else:
                bare.append(bare_docker_start(docker_client, image, stack.owner))
    aube_s = median([r["total_s"] for r in aube])
    floor_s = median([r["port_s"] for r in bare])
    result: dict[str, Any] = {
        "runtime": runtime,
        "aube_s": aube_s,
        "ratio": aube_s / floor_s,
        "aube_scale_reply_s": median([r["scale_reply_s"] for r in aube]),
        "floor_port_s": floor_s,
        "floor_echo_s": median([r["echo_s"] for r in bare]),
        "aube_samples_s": [r["total_s"] for r in aube],
        "floor_samples_s": [r["port_s"] for r in bare],
    }
    log(f"  {result}")
    return result
