"""NATS credentials of a platform: one password for the services, one for deployers.

`aube start` creates them once (random, in an env file of mode 0600 under the data folder) and passes them to
nats-server, whose deploy/nats.conf reads them from the environment; the services get the service user in their
AUBE_NATS_URL, and the aube CLI, upload.sh and delete.sh read the deployer's from the same file.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import string
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec

SERVICE_USER = "aube"
DEPLOYER_USER = "deployer"
ENV_SERVICE_PASSWORD = "AUBE_NATS_SERVICE_PASSWORD"
ENV_DEPLOYER_PASSWORD = "AUBE_NATS_DEPLOYER_PASSWORD"
ENV_CREDENTIALS_FILE = "AUBE_CREDENTIALS"  # where clients look for the file; default .data/credentials.env
DEFAULT_CREDENTIALS_FILE = Path(".data") / "credentials.env"

log = logging.getLogger(__name__)

# nats-server parses an environment variable named in its config as a config value, not as a string: a password
# like "-x…" or "12K" stops the server from starting ("variable reference … could not be parsed"). Passwords
# therefore start with a letter and hold only letters and digits (32 characters: about 190 bits).
PASSWORD_LENGTH = 32
SAFE_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def new_password() -> str:
    alphabet = string.ascii_letters + string.digits
    return secrets.choice(string.ascii_letters) + "".join(secrets.choice(alphabet) for _ in range(PASSWORD_LENGTH - 1))


class NatsCredentials(msgspec.Struct, frozen=True, kw_only=True):
    service_password: str
    deployer_password: str

    def environment(self) -> dict[str, str]:
        return {ENV_SERVICE_PASSWORD: self.service_password, ENV_DEPLOYER_PASSWORD: self.deployer_password}


def load_or_create(path: Path) -> NatsCredentials:
    """Read the credentials file, or create it with fresh random passwords (readable by its owner only).

    A file whose passwords nats-server cannot read from its environment (written by an earlier version) is
    replaced: clients read the same file, so they follow."""
    existing = load(path)
    if existing is not None:
        if all(SAFE_PASSWORD.fullmatch(p) for p in existing.environment().values()):
            return existing
        log.warning("%s holds a password nats-server cannot parse: replacing both passwords", path)
    creds = NatsCredentials(service_password=new_password(), deployer_password=new_password())
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in creds.environment().items()))
    os.replace(staging, path)  # whole or not at all: a reader never sees half a file
    return creds


def load(path: Path) -> NatsCredentials | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    service, deployer = values.get(ENV_SERVICE_PASSWORD), values.get(ENV_DEPLOYER_PASSWORD)
    if not service or not deployer:
        return None
    return NatsCredentials(service_password=service.strip(), deployer_password=deployer.strip())


def with_user(url: str, user: str, password: str) -> str:
    """`url` carrying `user:password`, unless it already names a user (an explicit choice wins)."""
    parts = urlsplit(url)
    if parts.username:
        return url
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{parts.hostname or '127.0.0.1'}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def redact(url: str) -> str:
    """The URL fit for a log line: the password replaced."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
