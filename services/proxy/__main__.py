"""`python -m aube.proxy`: one proxy replica, configured by AUBE_* environment variables.

SIGTERM and Ctrl-C end the replica cleanly: streams end, their claims are released, the lease is deleted.
"""

from __future__ import annotations

from aube.proxy.service import serve
from aube.shared.lifecycle import configure_logging, run_service
from aube.shared.settings import ProxySettings, settings_from_env

if __name__ == "__main__":
    configure_logging()
    run_service(serve, settings_from_env(ProxySettings))
