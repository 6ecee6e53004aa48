"""Hung peers, the pure parts: the proxy's socket options, the ping policy's checks and how it reaches the instance.

The behaviour itself (streams ending) is tested against real processes in tests/faults/test_hung_peers.py.
"""

from __future__ import annotations

import socket

import pytest

from aube.controlplane.manifest import parse_manifest
from aube.controlplane.runtimes.base import InstanceSpec, instance_environment
from aube.instance.config import ConfigError, InstanceConfig
from aube.instance.server import keepalive
from aube.proxy import sockopts
from aube.shared import names
from aube.shared.errors import InvalidBundle
from aube.shared.schemas import LimitsSection, Manifest
from aube.shared.settings import ProxySettings, settings_from_env


def test_the_default_options_end_a_dead_peer_in_about_20s() -> None:
    options = {(level, option): value for level, option, value in sockopts.plan(ProxySettings())}
    assert options == {
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE): 1,
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE): 10,
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL): 5,
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT): 3,
        (socket.IPPROTO_TCP, sockopts.TCP_USER_TIMEOUT): 20_000,  # milliseconds
    }


def test_none_disables_keepalive_and_the_user_timeout() -> None:
    settings = settings_from_env(ProxySettings, {"AUBE_TCP_KEEPALIVE_IDLE": "off", "AUBE_TCP_USER_TIMEOUT": "none"})
    assert sockopts.plan(settings) == []


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("tcp_keepalive_idle", 0.0, "AUBE_TCP_KEEPALIVE_IDLE"),
        ("tcp_keepalive_interval", 40000.0, "AUBE_TCP_KEEPALIVE_INTERVAL"),
        ("tcp_keepalive_count", 0, "AUBE_TCP_KEEPALIVE_COUNT"),
        ("tcp_user_timeout", -1.0, "AUBE_TCP_USER_TIMEOUT"),
        ("tcp_user_timeout", float("nan"), "AUBE_TCP_USER_TIMEOUT"),
    ],
)
def test_a_value_the_kernel_would_refuse_names_its_setting(field: str, value: float, named: str) -> None:
    settings = ProxySettings(**{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=named):
        sockopts.plan(settings)


def test_options_land_on_a_tcp_socket_and_a_unix_socket_is_left_alone() -> None:
    options = sockopts.plan(ProxySettings(tcp_keepalive_idle=7, tcp_user_timeout=3.5))
    with socket.socket() as tcp:
        sockopts.apply(tcp, options)
        assert tcp.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert tcp.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert tcp.getsockopt(socket.IPPROTO_TCP, sockopts.TCP_USER_TIMEOUT) == 3500
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        sockopts.apply(a, options)  # TCP options on a Unix socket would raise
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    sockopts.apply(None, options)


def test_the_ping_policy_is_off_unless_asked_for() -> None:
    limits = parse_manifest(b"").limits
    assert (limits.ping_interval, limits.ping_timeout) == (0, 10)
    limits = parse_manifest(b"[limits]\nping_interval = 15\nping_timeout = 5\n").limits
    assert (limits.ping_interval, limits.ping_timeout) == (15, 5)
    # A ping less often than the idle timeout lets the stream idle out between pings.
    parse_manifest(b"[limits]\nping_interval = 30\nstream_idle_timeout = 10\n")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("ping_interval = 0.1", "ping_interval must be 0 (no pings) or between 1 and 3600"),
        ("ping_interval = 7200", "ping_interval must be 0 (no pings) or between 1 and 3600"),
        ("ping_interval = -5", "ping_interval must be 0"),
        ("ping_interval = nan", "ping_interval must be a finite number"),
        ("ping_interval = 5\nping_timeout = 0", "ping_timeout must be between 1 and 3600"),
        ("ping_timeout = inf", "ping_timeout must be a finite number"),
        ("ping_interval = 5\nstream_idle_timeout = 60", "pings are traffic"),
        ('ping_interval = "often"', "Expected `float`"),
    ],
)
def test_a_bad_ping_policy_is_refused_with_the_key_named(text: str, says: str) -> None:
    with pytest.raises(InvalidBundle, match="limits") as caught:
        parse_manifest(f"[limits]\n{text}\n".encode())
    assert caught.value.code == "bundle_invalid_manifest"
    assert says in str(caught.value)


def test_the_runtimes_hand_the_policy_to_the_instance_server() -> None:
    manifest = Manifest(limits=LimitsSection(ping_interval=15, ping_timeout=2.5, max_message="4m"))
    spec = InstanceSpec(function="f", version=1, slot=0, instance_id="i", artifact="a", manifest=manifest, owner="o")
    env = instance_environment(spec, 8080)
    assert (env[names.ENV_PING_INTERVAL], env[names.ENV_PING_TIMEOUT]) == ("15", "2.5")
    assert env[names.ENV_MAX_MESSAGE] == str(4 * 1024 * 1024)
    config = InstanceConfig.from_env({**env, "AUBE_FN_DIR": "/"})
    assert (config.ping_interval, config.ping_timeout) == (15, 2.5)
    assert keepalive(config) == {"ping_interval": 15, "ping_timeout": 2.5, "max_size": 4 * 1024 * 1024}


def test_an_instance_without_the_policy_sends_no_pings() -> None:
    # websockets pings every 20 s unless told otherwise; those pings would keep any stream from idling out.
    assert keepalive(InstanceConfig.from_env({"AUBE_FN_DIR": "/"}))["ping_interval"] is None


def test_an_instance_takes_websockets_default_message_size_unless_told_and_refuses_nonsense() -> None:
    assert keepalive(InstanceConfig.from_env({"AUBE_FN_DIR": "/"}))["max_size"] == 1024 * 1024
    for bad in ("-1", "0", "1m", "lots"):
        with pytest.raises(ConfigError, match="AUBE_MAX_MESSAGE"):
            InstanceConfig.from_env({"AUBE_FN_DIR": "/", "AUBE_MAX_MESSAGE": bad})


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ('max_message = "512"', "between 1k and 64m"),
        ('max_message = "65m"', "between 1k and 64m"),
        ('max_message = "a lot"', "is not a size"),
        ('memory = "64m"\nmax_message = "32m"', "more than a quarter of limits.memory"),
    ],
)
def test_a_message_limit_out_of_range_is_refused_at_upload(limits: str, problem: str) -> None:
    with pytest.raises(InvalidBundle, match=problem):
        parse_manifest(f"[limits]\n{limits}\n")


def test_a_message_limit_may_be_a_number_of_bytes() -> None:
    assert parse_manifest("[limits]\nmax_message = 2097152\n").limits.max_message == "2097152"


def test_the_instance_refuses_a_malformed_policy() -> None:
    with pytest.raises(ConfigError, match="AUBE_PING_INTERVAL"):
        InstanceConfig.from_env({"AUBE_FN_DIR": "/", "AUBE_PING_INTERVAL": "-1"})
    with pytest.raises(ConfigError, match="AUBE_PING_TIMEOUT"):
        InstanceConfig.from_env({"AUBE_FN_DIR": "/", "AUBE_PING_TIMEOUT": "soon"})
