"""How pip runs for a function's requirements: its command line, environment and sandbox. Pure logic, no I/O.

pip runs with wheels only (`--only-binary=:all:` on a requirements file the platform wrote: nothing a deployer
controls can re-enable sdists), so installing runs no package code. The sandbox is the second line all the same:

- an unprivileged user: uid/gid 65534 (`setpriv`, also dropping every capability and setting no-new-privs),
  when the control plane runs as root; otherwise the control plane's own user;
- bubblewrap where it works: new ipc/pid/uts/cgroup namespaces (a user namespace too when not root), the
  system's read-only folders (/usr, the libraries, TLS and name-service files from /etc), the interpreter and
  its virtualenv read-only, the operator's pip/TLS files read-only, and writable only the build's own
  folder (target, home, tmp) and pip's cache. No data dir, no checkout, no /root, a /proc of its own.
  The network is shared: pip needs the package index.
- an environment built from nothing: PATH, HOME (the build's own), TMPDIR, LANG, and the operator's
  pip/proxy/TLS variables, which are trusted configuration. No AUBE_* variable, no NATS password.

Layout (the same names in and out of the sandbox; `Layout.inside` gives the in-sandbox paths):
    <work>/requirements.txt   written by the platform from the parsed requirements (read-only inside)
    <work>/target             pip's --target
    <work>/home, <work>/tmp   HOME and TMPDIR
    <cache>                   pip's --cache-dir
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import msgspec

NOBODY_UID = 65534
NOBODY_GID = 65534

SANDBOX_ROOT = "/build"
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

# Read-only from the host when they exist: what Python, TLS, name resolution and pip's global config need.
SYSTEM_RO_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/nsswitch.conf",
    "/etc/resolv.conf",
    "/etc/passwd",
    "/etc/group",
    "/etc/pip.conf",
    "/etc/xdg/pip",
    "/etc/os-release",  # pip's user agent names the distribution
    "/etc/debian_version",
    "/etc/lsb-release",
)

# The operator's configuration of pip, proxies and TLS: passed through as is.
OPERATOR_ENV = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_TRUSTED_HOST",
    "PIP_FIND_LINKS",
    "PIP_NO_INDEX",
    "PIP_CERT",
    "PIP_CLIENT_CERT",
    "PIP_CONFIG_FILE",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_TIMEOUT",
    "PIP_RETRIES",
    "PIP_PROXY",
    "PIP_PREFER_BINARY",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)
# Those of them that name files or folders, which must then be visible (read-only) in the sandbox.
_PATH_ENV = (
    "PIP_CERT",
    "PIP_CLIENT_CERT",
    "PIP_CONFIG_FILE",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
)


class Layout(msgspec.Struct, frozen=True, kw_only=True):
    """The build's folders as the pip process sees them."""

    requirements: str
    target: str
    home: str
    tmp: str
    cache: str

    @classmethod
    def under(cls, work: str, cache: str) -> Layout:
        return cls(
            requirements=f"{work}/requirements.txt",
            target=f"{work}/target",
            home=f"{work}/home",
            tmp=f"{work}/tmp",
            cache=cache,
        )

    @classmethod
    def inside(cls) -> Layout:
        return cls.under(SANDBOX_ROOT, f"{SANDBOX_ROOT}/cache")


def pip_command(python: str, layout: Layout) -> list[str]:
    """pip from wheels only, into `layout.target`. `-I`: no PYTHON* variable, no user site, no cwd on sys.path."""
    return [
        python, "-I", "-m", "pip", "install",
        "--disable-pip-version-check", "--no-input", "--no-color", "--progress-bar", "off",
        "--only-binary=:all:",
        "--target", layout.target,
        "--cache-dir", layout.cache,
        "-r", layout.requirements,
    ]  # fmt: skip


def pip_environment(environ: Mapping[str, str], layout: Layout) -> dict[str, str]:
    """The environment pip gets: built from nothing but the operator's pip/proxy/TLS settings."""
    env = {key: environ[key] for key in OPERATOR_ENV if key in environ}
    env.update(
        PATH=SANDBOX_PATH,
        HOME=layout.home,
        TMPDIR=layout.tmp,
        LANG="C.UTF-8",
        PYTHONDONTWRITEBYTECODE="1",  # for pip itself; the installed packages are still compiled into target
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return env


def operator_paths(environ: Mapping[str, str]) -> list[str]:
    """Absolute local paths the operator's variables name (certificates, pip config, find-links folders)."""
    found = [environ[key] for key in _PATH_ENV if environ.get(key, "").startswith("/")]
    for link in environ.get("PIP_FIND_LINKS", "").split():
        path = link.removeprefix("file://")
        if path.startswith("/"):
            found.append(path)
    return found


def minimal_roots(paths: Iterable[str]) -> list[str]:
    """The paths without duplicates and without those inside another one (a bind of the parent covers them)."""
    ordered = sorted({p.rstrip("/") or "/" for p in paths})
    roots: list[str] = []
    for path in ordered:
        if not any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots):
            roots.append(path)
    return roots


def parents(paths: Iterable[str]) -> list[str]:
    """Every folder above the paths (not "/"), each once, outer before inner."""
    found: set[str] = set()
    for path in paths:
        parts = path.strip("/").split("/")[:-1]
        found.update("/" + "/".join(parts[: i + 1]) for i in range(len(parts)))
    return sorted(found, key=lambda p: (p.count("/"), p))


def drop_privileges(setpriv: str, uid: int = NOBODY_UID, gid: int = NOBODY_GID) -> list[str]:
    """The prefix that runs a command as uid/gid with no capability (bounding set included) and no-new-privs."""
    return [
        setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
    ]  # fmt: skip


def namespace_flags(*, as_root: bool) -> list[str]:
    """bubblewrap's isolation. As root no user namespace: setpriv inside must switch to a real uid (65534), whose
    files outside are then owned by 65534, not by root. Otherwise a user namespace, mapping our own uid."""
    flags = ["--unshare-ipc", "--unshare-pid", "--unshare-uts", "--unshare-cgroup-try"]
    if not as_root:
        flags.append("--unshare-user")
    return [*flags, "--die-with-parent", "--new-session"]


def bwrap_argv(
    bwrap: str,
    *,
    as_root: bool,
    host: Layout,
    ro_paths: Sequence[str],
    env: Mapping[str, str],
    command: Sequence[str],
) -> list[str]:
    """The sandbox around `command` (whose paths are `Layout.inside()`); `host` holds the folders to bind."""
    inside = Layout.inside()
    argv = [bwrap, *namespace_flags(as_root=as_root), "--clearenv"]
    for key, value in sorted(env.items()):
        argv += ["--setenv", key, value]
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "01777", "--tmpfs", "/tmp"]
    binds = [*SYSTEM_RO_PATHS, *minimal_roots(ro_paths)]
    # Folders bubblewrap makes on its own to hold a mount are 0700 root, closed to the build user: made first.
    for folder in parents([*binds, SANDBOX_ROOT + "/x"]):
        argv += ["--perms", "0755", "--dir", folder]
    for path in binds:
        argv += ["--ro-bind-try", path, path]
    argv += [
        "--bind", host.target, inside.target,
        "--bind", host.home, inside.home,
        "--bind", host.tmp, inside.tmp,
        "--bind", host.cache, inside.cache,
        "--ro-bind", host.requirements, inside.requirements,
        "--chdir", inside.home,
    ]  # fmt: skip
    return [*argv, *command]


def probe_argv(bwrap: str, *, as_root: bool, setpriv: str | None) -> list[str]:
    """Does bubblewrap work here with the build's namespaces (and, as root, the switch to 65534 inside)?"""
    drop = drop_privileges(setpriv) if as_root and setpriv else []
    return [
        bwrap, *namespace_flags(as_root=as_root),
        "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", *drop, "true",
    ]  # fmt: skip
