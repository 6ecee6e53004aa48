"""Where the CLI looks for a tenant's credentials file, in order; the first place that names one wins.

    1. `--credentials FILE`                          a file named on the command line
    2. $AUBE_CREDENTIALS                             a file named in the environment
    3. $XDG_CONFIG_HOME/aube/credentials.env         the user's own (`aube login` writes it), default
       (~/.config/aube/credentials.env)              ~/.config when XDG_CONFIG_HOME is unset or not absolute
    4. .data/credentials.env of the platform folder  the folder `make start` / `aube start` ran in: the current
       the CLI runs from                             folder or the nearest one above it that has the file

A file named in 1 or 2 must exist and hold a login (else an error naming it: a typo must not quietly log in as
someone else). Without any file the CLI connects without a login, which a development server without accounts
accepts; a server with accounts refuses that, and the CLI then names every place it looked (`CredentialsMissing`).

The search is decided here without touching the network; `locate` only checks which files exist.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from aube.shared import credentials
from aube.shared.errors import AubeError

USER_CREDENTIALS_DIR = "aube"
USER_CREDENTIALS_FILE = "credentials.env"
USER_FILE = "per-user file, written by aube login"
PLATFORM_FOLDER = "the platform folder"


class CredentialsMissing(AubeError):
    """No credentials file anywhere, and the server wants a login (a CLI error: it never crosses NATS)."""

    code = "credentials_missing"


class CredentialsRefused(AubeError):
    """The server refused the login of the credentials file that was found."""

    code = "credentials_refused"


class Place(msgspec.Struct, frozen=True, kw_only=True):
    path: Path
    origin: str  # how it was chosen, for messages: --credentials, AUBE_CREDENTIALS, USER_FILE or PLATFORM_FOLDER
    named: bool = False  # named by the user (1, 2): it must exist


class Search(msgspec.Struct, frozen=True, kw_only=True):
    """The places to look, best first."""

    places: list[Place]

    def describe(self) -> str:
        """Every place looked, for a message (the platform folders as one)."""
        said: list[str] = []
        for place in self.places:
            if place.origin != PLATFORM_FOLDER:
                said.append(f"{place.path} ({place.origin})")
            elif not any(PLATFORM_FOLDER in s for s in said):
                said.append(f"{place.path}, and .data/credentials.env in each folder above it ({PLATFORM_FOLDER})")
        return "; ".join(said)


def user_credentials_file(environ: Mapping[str, str]) -> Path:
    """The per-user credentials file: $XDG_CONFIG_HOME/aube/credentials.env, default ~/.config/aube/… (the XDG base
    directory rules: a relative XDG_CONFIG_HOME is ignored)."""
    config = environ.get("XDG_CONFIG_HOME", "")
    if not config or not Path(config).is_absolute():
        home = environ.get("HOME") or str(Path.home())
        config = str(Path(home) / ".config")
    return Path(config) / USER_CREDENTIALS_DIR / USER_CREDENTIALS_FILE


def search(flag: str | None, environ: Mapping[str, str], cwd: Path) -> Search:
    """The places to look for `flag` (--credentials), the environment and the current folder, best first."""
    places: list[Place] = []
    if flag:
        places.append(Place(path=_absolute(Path(flag), cwd), origin="--credentials", named=True))
    named = environ.get(credentials.ENV_CREDENTIALS_FILE, "")
    if named:
        places.append(Place(path=_absolute(Path(named), cwd), origin=credentials.ENV_CREDENTIALS_FILE, named=True))
    places.append(Place(path=user_credentials_file(environ), origin=USER_FILE))
    cwd = _absolute(cwd, Path("/"))
    for folder in (cwd, *cwd.parents):
        places.append(Place(path=folder / credentials.DEFAULT_CREDENTIALS_FILE, origin=PLATFORM_FOLDER))
    return Search(places=places)


def locate(where: Search, is_file: Callable[[Path], bool] = Path.is_file) -> Place | None:
    """The first place that holds a file; None when there is none. A named file must exist."""
    for place in where.places:
        if place.named or is_file(place.path):
            return place
    return None


def load(place: Place) -> credentials.Login:
    """The login in the file at `place`; one that is missing or holds none is an error naming it."""
    login = credentials.load_login(place.path)
    if login is None:
        raise CredentialsMissing(
            f"no credentials found at {place.path} ({place.origin}): it is missing or holds no password"
        )
    return login


def _absolute(path: Path, cwd: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else cwd / path
