"""Host agents' NATS logins: one user per host, allowed its own host's subjects and lease and nothing of another's.

A login shared by every agent let any one host (one a function escaped to, say) act for all the others: subscribe
to `aube.host.<other>.start` and answer first (the control plane records the address in the answer, and proxies
then relay that host's clients to it), read the other hosts' start requests (each instance's secret), publish
exits in their name (their instances recycled under their streams) and overwrite their leases. So each host gets
its own user, `aube-agent-<host id>`, created by the operator (`aube host add <host id>`, the rig for its hosts):

    <data>/hosts.json          the host list: host id -> bcrypt hash (rendered into deploy/nats.conf's copy)
    <data>/hosts/<id>.env      the agent's login, mode 0600: AUBE_HOST_ID, AUBE_NATS_USER, AUBE_NATS_PASSWORD

Inside the platform account, inboxes are shared by whoever may subscribe to them, so an agent's replies and
deliveries go to an inbox prefix of its own (`_AUBE_AGENT.<host id>`), the only one it may subscribe to.

What an agent still reads, because its reconcile and its builds need it: every instance entry (the registry has
no per-host view), the other hosts' leases and the artifacts store.

Pure apart from `HostFile`, the operator's list on disk (the tenants' `TenantFile` with host ids for keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from aube.shared import names
from aube.shared import tenants as tenancy
from aube.shared.errors import InvalidRequest

USER_PREFIX = "aube-agent-"
INBOX_PREFIX = "_AUBE_AGENT"
HOST_LIST_FILE = "hosts.json"
HOST_CREDENTIALS_DIR = "hosts"
ENV_HOST_ID = "AUBE_HOST_ID"
# The line of deploy/nats.conf, inside the platform account's users, that the rendered agent users replace.
MARKER = "#@host-agents@"

# JetStream API an agent needs: its lease bucket (created if missing), reads of the instances (its reconcile) and
# of the artifacts store (what it prepares). Nothing of the functions, leases or scale intents, no write but its
# own lease's key.
_JS_API = [
    "$JS.API.INFO",
    "$JS.API.STREAM.INFO.KV_aube-hosts",
    "$JS.API.STREAM.INFO.KV_aube-instances",
    "$JS.API.STREAM.INFO.OBJ_aube-artifacts",
    "$JS.API.STREAM.CREATE.KV_aube-hosts",
    "$JS.API.STREAM.CREATE.OBJ_aube-artifacts",
    "$JS.API.STREAM.MSG.GET.KV_aube-hosts",
    "$JS.API.STREAM.MSG.GET.KV_aube-instances",
    "$JS.API.STREAM.MSG.GET.OBJ_aube-artifacts",
    "$JS.API.DIRECT.GET.KV_aube-hosts.>",
    "$JS.API.DIRECT.GET.KV_aube-instances.>",
    "$JS.API.DIRECT.GET.OBJ_aube-artifacts",
    "$JS.API.DIRECT.GET.OBJ_aube-artifacts.>",
    "$JS.API.CONSUMER.CREATE.KV_aube-instances",
    "$JS.API.CONSUMER.CREATE.KV_aube-instances.>",
    "$JS.API.CONSUMER.DELETE.KV_aube-instances.>",
    "$JS.API.CONSUMER.INFO.KV_aube-instances.>",
    "$JS.API.CONSUMER.MSG.NEXT.KV_aube-instances.>",
    "$JS.ACK.KV_aube-instances.>",
    "$JS.FC.>",
]


def validate_host_id(host_id: object) -> str:
    if not isinstance(host_id, str):
        raise InvalidRequest("a host id must be a string")
    return names.validate_host_id(host_id)


def user(host_id: str) -> str:
    return f"{USER_PREFIX}{host_id}"


def inbox_prefix(host_id: str) -> str:
    return f"{INBOX_PREFIX}.{host_id}"


def _quoted(items: list[str]) -> str:
    return ", ".join(f'"{item}"' for item in items)


def render_users(hosts: Mapping[str, str]) -> str:
    """The NATS users of `hosts` (host id -> bcrypt hash), for the platform account's user list."""
    blocks = []
    for host_id, password_hash in sorted(hosts.items()):
        host_id = validate_host_id(host_id)
        if not tenancy.BCRYPT_HASH.fullmatch(password_hash):
            raise InvalidRequest(f"host {host_id}: its password hash is not a bcrypt hash")
        publish = [
            names.host_subject(host_id, "exited"),
            # Its instances' output (`aube logs`): only lines that name this host as where they were read.
            names.logs_subject("*", host_id),
            tenancy.tenant_subject("*", names.logs_subject("*", host_id)),
            f"$KV.{names.BUCKET_HOSTS}.{host_id}",
            *_JS_API,
        ]
        subscribe = [f"{inbox_prefix(host_id)}.>"] + [names.host_subject(host_id, op) for op in names.HOST_OPERATIONS]
        blocks.append(
            f'      {{\n        user: "{user(host_id)}"\n        password: "{password_hash}"\n'
            f"        permissions: {{\n"
            f"          publish: {{ allow: [{_quoted(publish)}] }}\n"
            f"          subscribe: {{ allow: [{_quoted(subscribe)}] }}\n"
            f"          allow_responses: true\n"
            f"        }}\n      }}"
        )
    return "\n".join(blocks)


def render_config(template: str, hosts: Mapping[str, str]) -> str:
    """deploy/nats.conf with its marker line replaced by the users of `hosts`."""
    lines = template.splitlines(keepends=True)
    marked = [i for i, line in enumerate(lines) if line.strip() == MARKER]
    if len(marked) != 1:
        raise InvalidRequest(f"the NATS configuration must hold the line {MARKER!r} once (found {len(marked)})")
    users = render_users(hosts)
    lines[marked[0]] = users + "\n" if users else ""
    return "".join(lines)


class HostFile(tenancy.TenantFile):
    """The operator's host list (`<data>/hosts.json`: host id -> bcrypt hash of its agent's password)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, validate=validate_host_id, what="host list")
