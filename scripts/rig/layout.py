"""What the test rig runs, where, and on which ports. Pure data and pure functions: no Docker, no files.

    aube-nats-1..3    NATS cluster nodes (the nats-server binary alone), clients on 127.0.0.1:4222-4224,
                      monitoring on 127.0.0.1:8223-8225
    aube-host-1..3    Docker-in-Docker hosts: an inner engine and the `host` services below; proxies on
                      127.0.0.1:8093-8095 (operator endpoints, metrics, on 127.0.0.1:9093-9095)
    aube-plane        the `plane` services below, from the host image without an inner engine

All on the private Docker network `aube-cluster-net`; services reach NATS by the nodes' names there.
"""

from __future__ import annotations

import msgspec

NETWORK = "aube-cluster-net"
# On every container, volume and network the rig makes: `down` removes what carries it, and nothing else.
LABEL = "aube.rig"
# On each container: a digest of what it was started with. `up` keeps a running container whose digest matches
# and starts a new one in place of one that differs.
SPEC_LABEL = "aube.rig.spec"

NATS_IMAGE_REPOSITORY = "aube-rig-nats"
HOST_IMAGE_REPOSITORY = "aube-rig-host"
BASE_IMAGE = "aube-base:bookworm"  # what each inner engine needs to build function images

# Inside the containers.
CHECKOUT = "/opt/aube"  # the checkout, bind-mounted read-only: code changes need no image rebuild
VENV = "/opt/venv"  # Aube's dependencies, installed when the host image is built
RIG_CONF = "/etc/aube-rig"  # the container's own state folder (.data/cluster/<name>), read-only
NATS_CONF = "/etc/nats"
NATS_STORE = "/data"  # a volume
NATS_CLIENT_PORT = 4222
NATS_MONITOR_PORT = 8222
NATS_CLUSTER_PORT = 6222
PROXY_PORT = 8093
OPERATOR_PORT = 9093


class NatsNode(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    client_port: int  # published on 127.0.0.1
    monitor_port: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def inside_url(self) -> str:
        """How the rig's services reach it, on the rig network."""
        return f"nats://{self.name}:{NATS_CLIENT_PORT}"


class Box(msgspec.Struct, frozen=True, kw_only=True):
    """A container running Aube services: a host (with an inner engine) or the plane."""

    name: str
    role: str  # a key of SERVICES
    engine: bool  # runs an inner Docker engine
    proxy_port: int | None = None  # published on 127.0.0.1
    operator_port: int | None = None


NATS_NODES = [NatsNode(name=f"aube-nats-{i}", client_port=4221 + i, monitor_port=8222 + i) for i in (1, 2, 3)]
HOSTS = [
    Box(name=f"aube-host-{i}", role="host", engine=True, proxy_port=8092 + i, operator_port=9092 + i) for i in (1, 2, 3)
]
PLANE = Box(name="aube-plane", role="plane", engine=False)
BOXES = [PLANE, *HOSTS]


class ServiceSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One Aube service in a rig container: `python -m <module>` as the platform's NATS user `login` (a key of
    aube.shared.credentials.SERVICE_USERS, or `agent`: each host's own login, added per container by
    `state.prepare`), with `env` on top of the common environment. In `env`, `{address}`
    is the container's address on the rig network and `{name}` its name (filled in inside the container).

    `needs`: a module the checkout must have for the service to run; without it the service is skipped, so a
    service still being written can be listed already and starts once its code is there."""

    name: str
    module: str
    login: str
    needs: str = ""
    env: dict[str, str] = {}
    secrets: tuple[str, ...] = ()  # more variables of the platform's secrets (platform.env), passed as they are


# What runs where. Adding a service is one line.
SERVICES: dict[str, list[ServiceSpec]] = {
    "host": [
        ServiceSpec(
            name="agent",
            module="aube.agent",
            login="agent",
            needs="aube.agent",
            env={
                "AUBE_HOST_ID": "{name}",
                "AUBE_RUNTIME": "docker",
                # Instance ports are published on the host's address on the rig network, where proxies on the
                # other hosts reach them.
                "AUBE_PUBLISH_HOST": "{address}",
                "AUBE_ADVERTISE_HOST": "{address}",
                "AUBE_DATA_DIR": "/var/lib/aube",
            },
        ),
        ServiceSpec(
            name="proxy",
            module="aube.proxy",
            login="proxy",
            env={
                "AUBE_PROXY_PORT": str(PROXY_PORT),
                "AUBE_OPERATOR_HOST": "0.0.0.0",  # published on the machine's loopback only
                "AUBE_OPERATOR_PORT": str(OPERATOR_PORT),
            },
        ),
    ],
    "plane": [
        ServiceSpec(
            name="controlplane",
            module="aube.controlplane",
            login="controlplane",
            needs="aube.controlplane.runtimes.hosts",  # the control plane's host placement (`runtime = hosts`)
            env={
                "AUBE_RUNTIME": "hosts",
                "AUBE_HOST_RUNTIME": "docker",  # what the hosts' agents run (their AUBE_RUNTIME)
                "AUBE_DATA_DIR": "/var/lib/aube",
                "AUBE_PUBLIC_URL": f"ws://localhost:{PROXY_PORT}",
            },
            secrets=("AUBE_NATS_FETCH_PASSWORD",),
        ),
        ServiceSpec(name="reaper", module="aube.reaper", login="reaper"),
    ],
}

KV_REPLICAS = 3


def services_url() -> str:
    """AUBE_NATS_URL of the rig's services: every node, by its name on the rig network."""
    return ",".join(node.inside_url for node in NATS_NODES)


def client_url() -> str:
    """AUBE_NATS_URL of a client on this machine: every node's published port."""
    return ",".join(node.url for node in NATS_NODES)


class RunnableService(msgspec.Struct, frozen=True, kw_only=True):
    """A service as the container's runner (container/services.py) takes it."""

    name: str
    module: str
    env: dict[str, str]


class Logins(msgspec.Struct, frozen=True, kw_only=True):
    users: dict[str, tuple[str, str]]  # login -> (NATS user, the platform.env variable holding its password)
    passwords: dict[str, str]  # platform.env

    def with_login(self, login: str, user: str, password: str) -> Logins:
        """These logins and one more of a container's own (its host's agent), under a variable no other has."""
        variable = f"AUBE_RIG_LOGIN_{login.upper()}"
        return Logins(users={**self.users, login: (user, variable)}, passwords={**self.passwords, variable: password})


def runnable(spec: ServiceSpec, logins: Logins) -> RunnableService:
    """`spec` with its full environment: NATS servers, its own login and nothing of the other services'."""
    if spec.login not in logins.users:
        raise ValueError(f"service {spec.name}: no platform user {spec.login!r} (aube.shared.credentials)")
    user, password_variable = logins.users[spec.login]
    env = {
        "AUBE_NATS_URL": services_url(),
        "AUBE_NATS_USER": user,
        "AUBE_NATS_PASSWORD": logins.passwords[password_variable],
        "AUBE_KV_REPLICAS": str(KV_REPLICAS),
        **{name: logins.passwords[name] for name in spec.secrets},
        **spec.env,
    }
    return RunnableService(name=spec.name, module=spec.module, env=env)


def deployer_credentials(user: str, password: str) -> str:
    """.data/cluster/credentials.env: the form `make start` writes (aube.shared.credentials.write_login), plus
    the rig's servers, for `set -a; . .data/cluster/credentials.env` in a shell."""
    return f"AUBE_NATS_USER={user}\nAUBE_NATS_DEPLOYER_PASSWORD={password}\nAUBE_NATS_URL={client_url()}\n"


def security_options(box: Box) -> list[str]:
    """A box with an inner engine needs what dockerd needs (measured: issue 10); the plane needs nothing."""
    if not box.engine:
        return []
    return [
        "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined",
        "--security-opt", "apparmor=unconfined",
        "--security-opt", "systempaths=unconfined",
    ]  # fmt: skip


def ports(box: Box) -> list[str]:
    out = []
    if box.proxy_port is not None:
        out += ["-p", f"127.0.0.1:{box.proxy_port}:{PROXY_PORT}"]
    if box.operator_port is not None:
        out += ["-p", f"127.0.0.1:{box.operator_port}:{OPERATOR_PORT}"]
    return out
