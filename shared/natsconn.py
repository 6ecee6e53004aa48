"""Connecting to NATS: the one place that turns settings into nats-py connect options.

Credentials are connect options, not URL parts: nats-py sends a URL's credentials only to that URL's server, so a
reconnect to another cluster member would fail authorization, and a URL ends up in logs. `nats_url` may list
several servers separated by commas (nats-py does not split such a string itself).
"""

from __future__ import annotations

from typing import Any

import nats
from nats.aio.client import Client as NATS


def server_list(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


# The services' defaults (reliability issue): reconnect forever, quickly, and notice a dead or hung server within
# seconds (nats-py's default ping interval is 120 s: a client of a paused server got nothing done for 40 s and more).
# A killed cluster node sends no FIN (its network is gone with it): two unanswered pings, 2-3 s, are how a service
# learns it must move to another node, which is most of what a node's loss costs a claim (issue 10: within 5 s).
SERVICE_DEFAULTS: dict[str, Any] = {
    "max_reconnect_attempts": -1,
    "reconnect_time_wait": 0.5,
    "ping_interval": 1,
    "max_outstanding_pings": 2,
    # A reconnect that meets a paused or cut-off server (its kernel accepts the TCP connection, nothing answers)
    # moves on after this long (nats-py's default; the proxy used to wait 5 s there).
    "connect_timeout": 2,
}


async def connect(url: str, *, user: str = "", password: str = "", name: str, **options: Any) -> NATS:
    """Connect with the services' defaults; `options` override them (the CLI, for one, does not reconnect)."""
    if user:
        options.update(user=user, password=password)
    return await nats.connect(servers=server_list(url), name=name, **{**SERVICE_DEFAULTS, **options})
