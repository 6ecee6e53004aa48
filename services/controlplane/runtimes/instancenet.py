"""The Docker network instance containers run on, and the host firewall rules that close it.

Every instance joins one bridge network of Aube's own (`instance_network`, labelled LABEL_MANAGED) created with
inter-container traffic off (`enable_icc=false`: the engine drops forwarded traffic between two of its containers)
and a fixed bridge interface name (`instance_bridge`), so that a host rule can name it. The engine alone leaves
the host itself open: whatever listens on the host (NATS, its monitoring port, the proxy, another instance's
published port through docker-proxy) answers a container that dials the bridge's gateway or any other host
address. So the host's INPUT path from that bridge gets a chain of Aube's own (`names.firewall_chain`), in
iptables and (where present) ip6tables: replies to connections the host opened pass (the proxy and the health
probe reach instances through the published port, host to container), anything new is rejected.

What instances still reach: the engine's embedded DNS (inside each container's own network namespace, not the
host's INPUT) and, through the engine's NAT, addresses beyond the host. Docs: docs/security.md.

Both the decisions (which rules, whether an existing network is fit) and the I/O live here; the I/O functions
block and are called from the runtime's worker thread. Installing is idempotent: a second control plane finds
the network and the rules in place and leaves them as they are.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import docker.errors

from aube.shared import names
from aube.shared.errors import RuntimeFailure

logger = logging.getLogger(__name__)

OPT_ICC = "com.docker.network.bridge.enable_icc"
OPT_BRIDGE = "com.docker.network.bridge.name"
IPTABLES_WAIT = "5"  # seconds to wait for the xtables lock another program (the engine) may hold
IPTABLES_TIMEOUT = 20.0
# Linux interface names are at most 15 characters; iptables' -i accepts these characters.
_BRIDGE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")
_SYS_NET = Path("/sys/class/net")


class FirewallError(RuntimeFailure):
    """The host rules that close the instance bridge could not be installed."""


# -- decisions -------------------------------------------------------------------------------------------------


def network_options(bridge: str) -> dict[str, str]:
    return {OPT_ICC: "false", OPT_BRIDGE: bridge}


def network_problems(info: Mapping[str, Any], bridge: str) -> list[str]:
    """Why an existing network (the engine's inspect answer) is unfit to carry instances; empty when it is fit."""
    problems = []
    if info.get("Driver") != "bridge":
        problems.append(f"its driver is {info.get('Driver')!r}, not 'bridge'")
    if (info.get("Labels") or {}).get(names.LABEL_MANAGED) != "true":
        problems.append(f"it is not Aube's (no {names.LABEL_MANAGED}=true label)")
    options = info.get("Options") or {}
    if options.get(OPT_ICC) != "false":
        problems.append("traffic between its containers is allowed (enable_icc is not false)")
    if options.get(OPT_BRIDGE) != bridge:
        problems.append(f"its bridge is {options.get(OPT_BRIDGE)!r}, not {bridge!r}")
    if info.get("EnableIPv6"):
        # The engine filters IPv6 between containers only with its experimental ip6tables support.
        problems.append("it has IPv6 enabled")
    return problems


def chain_rules(ipv6: bool) -> list[list[str]]:
    """The chain's rules, spelt the way `iptables -S` prints them (so the installed chain can be compared)."""
    icmp = "icmp6-adm-prohibited" if ipv6 else "icmp-admin-prohibited"
    return [
        ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "RETURN"],
        # REJECT rather than DROP: a function that dials the host fails at once instead of waiting for a timeout.
        ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["-j", "REJECT", "--reject-with", icmp],
    ]


def restore_input(chain: str, ipv6: bool) -> str:
    """`iptables-restore --noflush` input that creates `chain`, or empties an existing one, and fills it."""
    rules = [f"-A {chain} {' '.join(rule)}" for rule in chain_rules(ipv6)]
    return "\n".join(["*filter", f":{chain} - [0:0]", *rules, "COMMIT", ""])


def listed_rules(chain: str, listing: str) -> list[list[str]]:
    """The rules of `chain` in an `iptables -S <chain>` listing (without its `-N` line)."""
    prefix = f"-A {chain} "
    return [line[len(prefix) :].split() for line in listing.splitlines() if line.startswith(prefix)]


def check_names(network: str, bridge: str) -> None:
    if not network or "/" in network:
        raise RuntimeFailure(f"invalid instance network name {network!r} (AUBE_INSTANCE_NETWORK)")
    if not _BRIDGE_NAME.fullmatch(bridge):
        raise RuntimeFailure(
            f"invalid instance bridge name {bridge!r} (AUBE_INSTANCE_BRIDGE): 1-15 of A-Z a-z 0-9 _ . -"
        )


# -- the network -----------------------------------------------------------------------------------------------


def ensure(client: Any, network: str, bridge: str, firewall: bool) -> None:
    """The network exists and fits, and (with `firewall`) the host rules are in place: at start and before every
    instance, so an instance never starts on a bridge whose rules someone flushed (a firewall reload) since."""
    ensure_network(client, network, bridge)
    if firewall:
        install_firewall(bridge)


def ensure_network(client: Any, network: str, bridge: str) -> None:
    """Create the instance network when missing; RuntimeFailure if one of that name exists but is unfit."""
    check_names(network, bridge)
    api = client.api
    try:
        info = api.inspect_network(network)
    except docker.errors.NotFound:
        try:
            api.create_network(
                network,
                driver="bridge",
                options=network_options(bridge),
                labels={names.LABEL_MANAGED: "true"},
                enable_ipv6=False,
                check_duplicate=True,
            )
            logger.info("created the instance network %s (bridge %s)", network, bridge)
        except docker.errors.APIError as e:
            if e.status_code != 409:  # 409: another control plane created it meanwhile
                raise RuntimeFailure(f"cannot create the instance network {network}: {e.explanation or e}") from e
        info = api.inspect_network(network)
    problems = network_problems(info, bridge)
    if problems:
        raise RuntimeFailure(
            f"the Docker network {network!r} cannot carry instances: {'; '.join(problems)}. Remove it "
            f"(docker network rm {network}) to let Aube create it, or name another with AUBE_INSTANCE_NETWORK"
        )


def remove_network(client: Any, network: str) -> None:
    """Remove the instance network (tests, and operators uninstalling); a missing one is not an error."""
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_network(network)


# -- the host firewall -----------------------------------------------------------------------------------------


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=IPTABLES_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FirewallError(f"{argv[0]} failed: {e}") from e


def _tools() -> list[tuple[str, bool]]:
    """(binary, is_ipv6) for each iptables flavour to program; iptables itself is required."""
    if shutil.which("iptables") is None:
        raise FirewallError("iptables is not installed (Debian package iptables)")
    tools = [("iptables", False)]
    if shutil.which("ip6tables") is not None:
        tools.append(("ip6tables", True))
    elif not _warned_no_ip6tables:
        _warned_no_ip6tables.append(True)
        logger.warning("ip6tables is not installed: the instance bridge's IPv6 input is not filtered")
    return tools


_warned_no_ip6tables: list[bool] = []  # once per process: the check runs before every instance start


def install_firewall(bridge: str) -> None:
    """Reject new connections from `bridge` to the host, idempotently; FirewallError when it cannot be done."""
    if not (_SYS_NET / bridge).exists():
        # The engine runs elsewhere (DOCKER_HOST on another machine): rules here would protect nothing.
        raise FirewallError(f"the instance bridge {bridge} is not an interface of this host (a remote engine?)")
    chain = names.firewall_chain(bridge)
    for tool, ipv6 in _tools():
        ipt = [tool, "-w", IPTABLES_WAIT]
        listing = _run([*ipt, "-S", chain])
        if listing.returncode != 0 or listed_rules(chain, listing.stdout) != chain_rules(ipv6):
            # One restore creates (or empties) the chain and fills it in a single commit: a second control plane
            # starting at the same moment never sees, or leaves, a half-written chain.
            _check(_run([f"{tool}-restore", "-w", IPTABLES_WAIT, "--noflush"], restore_input(chain, ipv6)))
            logger.info("%s: chain %s written (host input from bridge %s is closed)", tool, chain, bridge)
        jump = ["INPUT", "-i", bridge, "-j", chain]
        if _run([*ipt, "-C", *jump]).returncode != 0:
            # First in INPUT: an operator's broad ACCEPT rule further down must not open the host to instances.
            _check(_run([*ipt, "-I", jump[0], "1", *jump[1:]]))
            logger.info("%s: INPUT from bridge %s now goes through %s", tool, bridge, chain)


def remove_firewall(bridge: str) -> None:
    """Remove the jump and the chain (tests, and operators uninstalling); what is missing is skipped."""
    chain = names.firewall_chain(bridge)
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        ipt = [tool, "-w", IPTABLES_WAIT]
        while _run([*ipt, "-D", "INPUT", "-i", bridge, "-j", chain]).returncode == 0:
            pass
        _run([*ipt, "-F", chain])
        _run([*ipt, "-X", chain])


def _check(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        raise FirewallError(f"{' '.join(done.args)} failed: {done.stderr.strip()}")
