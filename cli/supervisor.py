"""`aube start`'s supervisor: runs the platform's processes, restarts one that dies, stops them all in order.

A crashed service is restarted with a growing delay (`restart_delay`, pure) while every other service keeps running:
one proxy replica's crash must not cut the other replica's streams. A service that stayed up long enough counts as
healthy again, so an occasional crash never waits for the longest delay. Ctrl-C (SIGINT) or SIGTERM stops
everything in reverse start order, each service within its own time limit.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FIRST_DELAY = 0.5
MAX_DELAY = 15.0
HEALTHY_AFTER = 30.0  # seconds up after which a service's earlier crashes are forgotten
POLL_INTERVAL = 0.1


def restart_delay(recent_crashes: int) -> float:
    """Seconds to wait before the restart that follows `recent_crashes` crashes in a row (1 = the first)."""
    return min(MAX_DELAY, FIRST_DELAY * 2.0 ** max(0, recent_crashes - 1))


@dataclass
class Service:
    """One supervised process. `env_for(generation)` gives its extra environment for each start (0, 1, ...)."""

    label: str
    argv: list[str]
    env_for: Callable[[int], dict[str, str]]
    stop_timeout: float = 15.0
    ready: Callable[[subprocess.Popen[bytes]], None] | None = None  # waits until it serves; raises if it cannot
    proc: subprocess.Popen[bytes] | None = None
    generation: int = 0
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float | None = None


class Supervisor:
    def __init__(self, workdir: Path, base_env: dict[str, str], say: Callable[[str], None]) -> None:
        self.workdir = workdir
        self.base_env = base_env
        self.say = say
        self.services: list[Service] = []
        self.stopping = False

    def install_signal_handlers(self) -> None:
        def on_signal(_signum: int, _frame: object) -> None:
            self.stopping = True

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def start(self, service: Service) -> None:
        """Start `service` now (and wait for it to be ready, if it says how) and supervise it from then on."""
        self.services.append(service)
        self._spawn(service)
        if service.ready is not None and service.proc is not None:
            service.ready(service.proc)

    def _spawn(self, service: Service) -> None:
        env = {**self.base_env, **service.env_for(service.generation)}
        # Its own session: Ctrl-C in a terminal signals the whole foreground group, and nats-server would quit at
        # once, before the control plane could stop its instances. Only the supervisor takes the signal.
        service.proc = subprocess.Popen(service.argv, cwd=self.workdir, env=env, start_new_session=True)
        service.started_at = time.monotonic()
        service.restart_at = None
        self.say(f"started {service.label} (pid {service.proc.pid})")

    def run(self) -> None:
        """Supervise until a stop signal: restart what dies, with backoff."""
        while not self.stopping:
            now = time.monotonic()
            for service in self.services:
                self._tend(service, now)
            time.sleep(POLL_INTERVAL)

    def _tend(self, service: Service, now: float) -> None:
        proc = service.proc
        if proc is not None and proc.poll() is not None:
            if now - service.started_at >= HEALTHY_AFTER:
                service.crashes = 0
            service.crashes += 1
            delay = restart_delay(service.crashes)
            service.proc = None
            service.restart_at = now + delay
            self.say(f"{service.label} exited with status {proc.returncode}: restarting it in {delay:g}s")
        if service.proc is None and service.restart_at is not None and now >= service.restart_at:
            service.generation += 1
            self._spawn(service)

    def stop_all(self) -> None:
        """Reverse start order (proxies, reaper, control plane, NATS), each within its own time limit."""
        for service in reversed(self.services):
            proc = service.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(service.stop_timeout)
            except subprocess.TimeoutExpired:
                self.say(f"{service.label} did not stop in time: killing it")
                proc.kill()
                proc.wait()
