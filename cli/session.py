"""The CLI's NATS connection: which servers, which login (credsearch), and a refusal told as such.

nats-py reports a refused login through its error callback (by default a logged traceback) and then raises a bare
`nats.errors.Error("nats: 'Authorization Violation'")`; here the callback is silenced and the error becomes
`CredentialsRefused` (a file's login was refused: which file) or `CredentialsMissing` (no file was found and the
server wants a login: where the CLI looked). Any other connect failure is `ServiceUnavailable` naming the servers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from aube.cli import credsearch
from aube.cli.credsearch import CredentialsMissing, CredentialsRefused
from aube.shared import credentials, natsconn
from aube.shared.credentials import redact
from aube.shared.errors import ServiceUnavailable
from aube.shared.settings import DEFAULT_NATS_URL

REFUSED = "authorization violation"  # nats-server's word for a login it does not accept (or no login at all)


def nats_url(flag: str | None, environ: Mapping[str, str], found: credsearch.Place | None) -> str:
    """--nats, else $AUBE_NATS_URL, else the credentials file's AUBE_NATS_URL, else the default server."""
    from_file = credentials.servers_of(found.path) if found else ""
    return flag or environ.get(credentials.ENV_NATS_URL) or from_file or DEFAULT_NATS_URL


async def _quiet(_error: Exception) -> None:
    """nats-py's error callback: the error is raised to us as well, and told once, without a traceback."""


async def connect(flag_url: str | None, flag_credentials: str | None, environ: Mapping[str, str], cwd: Path) -> NATS:
    where = credsearch.search(flag_credentials, environ, cwd)
    found = credsearch.locate(where)
    login = credsearch.load(found) if found else None
    url = nats_url(flag_url, environ, found)
    try:
        return await natsconn.connect(
            url,
            user=login.user if login else "",
            password=login.password if login else "",
            name="aube-cli",
            connect_timeout=5,
            max_reconnect_attempts=1,
            allow_reconnect=False,
            error_cb=_quiet,
        )
    except (OSError, TimeoutError, nats.errors.Error) as e:
        if REFUSED not in str(e).lower():
            raise ServiceUnavailable(f"cannot reach NATS at {redact(url)}: {e}") from e
        if found is None or login is None:
            raise CredentialsMissing(
                f"the NATS server at {redact(url)} wants a login (Authorization Violation) and no credentials file "
                f"was found; looked in: {where.describe()}. `aube login FILE` keeps a tenant's credentials file "
                "where aube finds it from any folder"
            ) from e
        raise CredentialsRefused(
            f"the NATS server at {redact(url)} refused the credentials in {found.path} ({found.origin}) for user "
            f"{login.user!r} (Authorization Violation): the password is wrong or was rotated, or the file is for "
            "another platform (--nats, $AUBE_NATS_URL or the file's AUBE_NATS_URL name the servers)"
        ) from e
