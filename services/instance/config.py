"""The in-instance server's settings, read from the environment the runtime sets (see
`aube.controlplane.runtimes.base.instance_environment`).

Only the standard library here: this module ships into every function image.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# The line a runtime reads to learn the port when it asked for any free one (AUBE_INSTANCE_PORT=0): the kernel
# picks the port at bind time, so two instances starting at once can never be handed the same one.
LISTENING_MARKER = "aube-instance listening on"

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 8080
# How long a command gets between SIGTERM and SIGKILL once its stream is over.
DEFAULT_COMMAND_GRACE = 2.0
# After SIGTERM: how long open streams get to close before the process exits regardless.
DEFAULT_SHUTDOWN_GRACE = 5.0
# The ping policy (`[limits] ping_interval` / `ping_timeout`): 0 = the server sends no pings (websockets' own
# default of 20 s is not used, so a function's stream_idle_timeout is not defeated by pings it never asked for).
DEFAULT_PING_TIMEOUT = 10.0
# `[limits] max_message`: the largest message a client may send (websockets' own default, 1 MiB).
DEFAULT_MAX_MESSAGE = 1024 * 1024

# The instance credential (aube.shared.names spells them too; a unit test keeps the two in step). The runtime sets
# the SHA-256 of the secret, never the secret: the function's code can read its environment (and /proc/1/environ),
# and a hash it reads there is nothing it could present.
SECRET_HEADER = "X-Aube-Instance-Secret"
SECRET_SHA256_ENV = "AUBE_INSTANCE_SECRET_SHA256"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ConfigError(ValueError):
    """The environment does not describe a runnable instance."""


@dataclass(frozen=True, kw_only=True)
class InstanceConfig:
    fn_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # A Unix socket path to listen on instead of host:port (AUBE_INSTANCE_SOCKET): a sandbox without a network.
    socket: str = ""
    # A Unix socket path where the proxy may hand over a client's own connection (AUBE_INSTANCE_HANDOFF,
    # handoff.py); "" = none (every stream is relayed).
    handoff: str = ""
    runtime: Literal["python", "command"] = "python"
    command: list[str] = field(default_factory=list)
    mode: Literal["lines", "binary"] = "lines"
    instance_id: str = ""
    function: str = ""
    version: str = ""
    command_grace: float = DEFAULT_COMMAND_GRACE
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    # Empty: no credential is asked for (a server started by hand); the platform's runtimes always set one.
    secret_sha256: str = ""
    ping_interval: float = 0.0
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    max_message: int = DEFAULT_MAX_MESSAGE

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InstanceConfig:
        env = os.environ if environ is None else environ
        fn_dir = Path(env.get("AUBE_FN_DIR") or os.getcwd()).resolve()

        port_text = env.get("AUBE_INSTANCE_PORT") or str(DEFAULT_PORT)
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"AUBE_INSTANCE_PORT must be an integer, not {port_text!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"AUBE_INSTANCE_PORT out of range: {port}")

        runtime = env.get("AUBE_FN_RUNTIME") or "python"
        if runtime not in ("python", "command"):
            raise ConfigError(f"AUBE_FN_RUNTIME must be 'python' or 'command', not {runtime!r}")

        mode = env.get("AUBE_FN_MODE") or "lines"
        if mode not in ("lines", "binary"):
            raise ConfigError(f"AUBE_FN_MODE must be 'lines' or 'binary', not {mode!r}")

        command_text = env.get("AUBE_FN_COMMAND") or "[]"
        try:
            command = json.loads(command_text)
        except json.JSONDecodeError:
            raise ConfigError(f"AUBE_FN_COMMAND is not JSON: {command_text!r}") from None
        if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
            raise ConfigError(f"AUBE_FN_COMMAND must be a JSON list of strings: {command_text!r}")
        if runtime == "command" and not command:
            raise ConfigError("runtime 'command' needs a non-empty AUBE_FN_COMMAND")

        grace = _seconds(env, "AUBE_COMMAND_GRACE", DEFAULT_COMMAND_GRACE)
        shutdown_grace = _seconds(env, "AUBE_SHUTDOWN_GRACE", DEFAULT_SHUTDOWN_GRACE)

        secret_sha256 = (env.get(SECRET_SHA256_ENV) or "").strip().lower()
        if secret_sha256 and not _SHA256_HEX.fullmatch(secret_sha256):
            # Never echo the value: it would put the credential's hash into a log for no reason.
            raise ConfigError(f"{SECRET_SHA256_ENV} must be 64 hexadecimal digits (a SHA-256)")

        return cls(
            fn_dir=fn_dir,
            host=env.get("AUBE_INSTANCE_HOST") or DEFAULT_HOST,
            port=port,
            socket=env.get("AUBE_INSTANCE_SOCKET", ""),
            handoff=env.get("AUBE_INSTANCE_HANDOFF", ""),
            runtime="command" if runtime == "command" else "python",
            command=command,
            mode="binary" if mode == "binary" else "lines",
            instance_id=env.get("AUBE_INSTANCE_ID", ""),
            function=env.get("AUBE_FUNCTION", ""),
            version=env.get("AUBE_VERSION", ""),
            command_grace=grace,
            shutdown_grace=shutdown_grace,
            secret_sha256=secret_sha256,
            ping_interval=_seconds(env, "AUBE_PING_INTERVAL", 0.0),
            ping_timeout=_seconds(env, "AUBE_PING_TIMEOUT", DEFAULT_PING_TIMEOUT),
            max_message=_bytes(env, "AUBE_MAX_MESSAGE", DEFAULT_MAX_MESSAGE),
        )


def _bytes(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name) or str(default)
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{name} must be a positive number of bytes, not {text!r}")
    return int(text)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name) or str(default)
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, not {text!r}") from None
    if not value >= 0:  # also refuses NaN
        raise ConfigError(f"{name} must not be negative: {text!r}")
    return value
