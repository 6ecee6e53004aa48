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


async def connect(url: str, *, user: str = "", password: str = "", name: str, **options: Any) -> NATS:
    if user:
        options.update(user=user, password=password)
    return await nats.connect(servers=server_list(url), name=name, **options)
