"""Tenants: who may deploy, and the NATS configuration that keeps them apart.

A tenant is a deployer identity created by the operator (`aube tenant add NAME`). Each tenant is a NATS account
of its own (deploy/nats.conf explains the layout); this module names a tenant's subjects and renders the two files
deploy/nats.conf includes, from the list of tenants and their bcrypt password hashes. Pure: no I/O here except
`TenantFile`, the operator's list on disk.

Why accounts and not users with permissions in one account: inside one account every user who may subscribe to
`_INBOX.>` reads every other user's replies (the registry's KV replies included), and a request carries no proof of
who sent it. Accounts give each tenant its own subject space, inboxes and JetStream; the platform account exports
`aube.t.<tenant>.fn.*` to that one account, which imports it as the contract's `aube.fn.*`. The subject a request
arrives on in the platform account therefore names its tenant, and nothing a tenant sends can change that.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from aube.shared import names
from aube.shared.errors import InvalidRequest

# The default tenant of a single-tenant platform: `make start` creates it, its credentials are .data/credentials.env.
DEFAULT_TENANT = "deployer"
# Requests that arrive on the contract's plain subjects inside the platform account come from the platform itself
# (an operator's tool, or a development server without accounts); they act for this pseudo-tenant, which may touch
# every function.
OPERATOR = ""

# Lower-case, so it can never be the platform account `AUBE`, nor nats-server's `$G`/`$SYS`; `aube…` is reserved
# for the platform's own users (`aube-fetch-<tenant>` lives in each tenant's account).
TENANT_PATTERN = re.compile(r"^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$")

PLATFORM_ACCOUNT = "AUBE"
TENANT_SUBJECT_PREFIX = "aube.t"
# Each tenant's account also holds this platform user, which the control plane uses to read (and then delete) a
# bundle the tenant put in its own object store. Its password is the platform's, from the server's environment.
FETCH_USER_PREFIX = "aube-fetch-"
# The fetch user's inboxes (its replies and its consumers' deliveries). Not `_INBOX`: the tenant shares the account
# and could read them and publish into them (made-up chunks for the read in progress); tenant users may neither
# subscribe nor publish here.
FETCH_INBOX_PREFIX = "_AUBE_FETCH"
ENV_FETCH_PASSWORD = "AUBE_NATS_FETCH_PASSWORD"
RELOAD_PROBE_SUBJECT = names.SUBJECT_LIST  # which the fetch user may publish (aube.shared.reloadcheck)
# An upload's reply comes when the build and health checks are done: the service import must stay open that long.
RESPONSE_THRESHOLD = "30m"
BCRYPT_HASH = re.compile(r"\$2[aby]?\$[0-9]{2}\$[./A-Za-z0-9]{53}")
DEFAULT_JETSTREAM_QUOTA = "512MB"  # a tenant's file storage: its bundles in flight
# Without these a tenant could open connections and create streams and consumers without end, a cost every
# tenant and the platform's registry share. A tenant needs one stream (its bundle store, `OBJ_aube-bundles`), a
# consumer per bundle being read (the control plane's fetch, the CLI), a connection per command and one per
# upload the control plane is reading: the fetch user counts against the same limit, so a tenant that uses up its
# connections only delays its own uploads.
TENANT_MAX_CONNECTIONS = 64
TENANT_MAX_SUBSCRIPTIONS = 1000  # a connection that goes past it is closed by the server
TENANT_MAX_STREAMS = 4
TENANT_MAX_CONSUMERS = 64  # per stream (nats-server's account limit is per stream)


def validate_tenant(name: object) -> str:
    if not isinstance(name, str) or not TENANT_PATTERN.fullmatch(name):
        raise InvalidRequest(
            f"invalid tenant name {str(name)[:40]!r}: use 1-32 characters of a-z, 0-9 and '-', starting with a letter"
        )
    if name.startswith("aube"):
        raise InvalidRequest(f"invalid tenant name {name!r}: names starting with 'aube' are the platform's")
    return name


def tenant_subject(tenant: str, subject: str) -> str:
    """`aube.fn.upload` as it arrives in the platform account from `tenant`: `aube.t.<tenant>.fn.upload`."""
    return f"{TENANT_SUBJECT_PREFIX}.{tenant}.{subject.removeprefix('aube.')}"


def tenant_of(subject: str) -> str:
    """The tenant a request subject names (`aube.t.<tenant>.…`), or OPERATOR for a plain subject."""
    prefix = f"{TENANT_SUBJECT_PREFIX}."
    if not subject.startswith(prefix):
        return OPERATOR
    return subject[len(prefix) :].split(".", 1)[0]


def may_touch(requester: str, owner: str) -> bool:
    """Whether `requester` may re-upload, delete, list or follow a function `owner` deployed."""
    return requester in (OPERATOR, owner)


def _prefixes(stream_prefixes: str | Sequence[str]) -> list[str]:
    return [stream_prefixes] if isinstance(stream_prefixes, str) else list(stream_prefixes)


def render_exports(
    tenants: Mapping[str, str], request_subjects: list[str], stream_prefixes: str | Sequence[str]
) -> str:
    """The platform account's `exports` (included in deploy/nats.conf's AUBE block): the request services, and the
    streams under each of `stream_prefixes` (events, instances' output), each to its tenant's account only."""
    lines = ["# Written by aube from the tenant list; do not edit.", "exports: ["]
    for tenant in sorted(tenants):
        for subject in request_subjects:
            lines.append(
                f'  {{service: "{tenant_subject(tenant, subject)}", accounts: [{tenant}], '
                f'response_threshold: "{RESPONSE_THRESHOLD}"}}'
            )
        for prefix in _prefixes(stream_prefixes):
            lines.append(f'  {{stream: "{tenant_subject(tenant, prefix)}.>", accounts: [{tenant}]}}')
    lines.append("]")
    return "\n".join(lines) + "\n"


def render_accounts(
    tenants: Mapping[str, str],
    request_subjects: list[str],
    stream_prefixes: str | Sequence[str],
    bucket: str,
    quota: str,
) -> str:
    """One account per tenant (included in deploy/nats.conf's `accounts` block); `tenants` maps name -> bcrypt."""
    out = ["# Written by aube from the tenant list; do not edit."]
    stream = f"OBJ_{bucket}"
    for tenant in sorted(tenants):
        password = tenants[tenant]
        # nats-server takes any other string as a plain password, and an empty one as none at all.
        if not BCRYPT_HASH.fullmatch(password):
            raise InvalidRequest(f"tenant {tenant}: the stored password hash is malformed")
        imports = [
            f'{{service: {{account: {PLATFORM_ACCOUNT}, subject: "{tenant_subject(tenant, s)}"}}, to: "{s}"}}'
            for s in request_subjects
        ]
        imports += [
            f'{{stream: {{account: {PLATFORM_ACCOUNT}, subject: "{tenant_subject(tenant, prefix)}.>"}}, '
            f'to: "{prefix}.>"}}'
            for prefix in _prefixes(stream_prefixes)
        ]
        # The fetch user reads and deletes bundles in this tenant's object store, nothing else.
        fetch_allow = [
            "$JS.API.INFO",
            "$JS.API.STREAM.NAMES",
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.STREAM.PURGE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.ACK.{stream}.>",
            "$JS.FC.>",
            f"$O.{bucket}.M.>",
            # The probe that checks, after a reload, that this account's imports reach the platform's account
            # (aube.shared.reloadcheck): a list request without a reply subject.
            RELOAD_PROBE_SUBJECT,
        ]
        out += [
            f"{tenant}: {{",
            f"  jetstream: {{max_file: {quota}, max_mem: 0, max_streams: {TENANT_MAX_STREAMS}, "
            f"max_consumers: {TENANT_MAX_CONSUMERS}}}",
            f"  limits: {{max_connections: {TENANT_MAX_CONNECTIONS}, max_subscriptions: {TENANT_MAX_SUBSCRIPTIONS}}}",
            "  users: [",
            f'    {{user: "{tenant}", password: "{password}", permissions: {{',
            f'      publish: {{deny: ["{FETCH_INBOX_PREFIX}.>"]}}, subscribe: {{deny: ["{FETCH_INBOX_PREFIX}.>"]}}',
            "    }}",
            f'    {{user: "{FETCH_USER_PREFIX}{tenant}", password: ${ENV_FETCH_PASSWORD}, permissions: {{',
            f"      publish: {{allow: {json.dumps(fetch_allow)}}}",
            f'      subscribe: {{allow: ["{FETCH_INBOX_PREFIX}.>"]}}',
            "    }}",
            "  ]",
            "  imports: [",
            *(f"    {line}" for line in imports),
            "  ]",
            "}",
        ]
    return "\n".join(out) + "\n"


_MAX_FILE_STORE = re.compile(r"^\s*max_file_store\s*[:=]?\s*\"?([0-9]+)\s*([KMGT]?)B?\"?\s*(#.*)?$", re.M | re.I)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def size_bytes(text: str) -> int:
    """A nats-server size (`512MB`, `4GB`, `1024`) in bytes."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([KMGT]?)B?\s*", text, re.I)
    if match is None:
        raise InvalidRequest(f"not a size: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def tenants_that_fit(server_config: str, quota: str = DEFAULT_JETSTREAM_QUOTA) -> int | None:
    """How many tenant accounts the server can reserve `quota` of file storage for: nats-server reserves each
    account's quota from its `max_file_store` and, when they do not fit, starts no JetStream at all. None when
    the configuration sets no `max_file_store` (the server then sizes it from the disk)."""
    match = _MAX_FILE_STORE.search(server_config)
    if match is None:
        return None
    return (int(match.group(1)) * _UNITS[match.group(2).upper()]) // size_bytes(quota)


class TenantFile:
    """The operator's tenant list (`<data>/tenants.json`: name -> bcrypt hash of the tenant's password). The same
    form holds the host list (`aube.shared.agentlogins.HostFile`), with `validate` for its keys."""

    def __init__(
        self, path: Path, *, validate: Callable[[object], str] | None = None, what: str = "tenant list"
    ) -> None:
        self.path = path
        self.validate = validate or validate_tenant
        self.what = what

    def load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"the {self.what} {self.path} is unreadable: {e}") from e
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise InvalidRequest(f"the {self.what} {self.path} is malformed")
        return {self.validate(k): v for k, v in data.items()}

    def save(self, tenants: Mapping[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(dict(sorted(tenants.items())), f, indent=1)
        os.replace(staging, self.path)
