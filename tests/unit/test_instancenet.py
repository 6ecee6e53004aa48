"""The instance network's decisions: which existing networks are fit, and the host rules' spelling."""

from __future__ import annotations

from typing import Any

from aube.controlplane.runtimes import instancenet
from aube.controlplane.runtimes.base import InstanceSpec, instance_environment
from aube.shared import names
from aube.shared.schemas import Manifest


def _network(**changes: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "Driver": "bridge",
        "Labels": {names.LABEL_MANAGED: "true"},
        "Options": instancenet.network_options("aube-inst0"),
        "EnableIPv6": False,
    }
    info.update(changes)
    return info


def test_a_network_of_aubes_own_is_fit() -> None:
    assert instancenet.network_problems(_network(), "aube-inst0") == []


def test_unfit_networks_say_why() -> None:
    def problems(**changes: Any) -> str:
        return "; ".join(instancenet.network_problems(_network(**changes), "aube-inst0"))

    assert "not Aube's" in problems(Labels=None)
    assert "not Aube's" in problems(Labels={names.LABEL_MANAGED: "false"})
    assert "driver" in problems(Driver="overlay")
    assert "enable_icc" in problems(Options={instancenet.OPT_BRIDGE: "aube-inst0"})
    assert "enable_icc" in problems(Options={**instancenet.network_options("aube-inst0"), instancenet.OPT_ICC: "true"})
    assert "bridge is" in problems(Options={instancenet.OPT_ICC: "false", instancenet.OPT_BRIDGE: "br-other"})
    assert "IPv6" in problems(EnableIPv6=True)


def test_listed_rules_read_back_what_iptables_prints() -> None:
    chain = names.firewall_chain("aube-inst0")
    listing = (
        f"-N {chain}\n"
        f"-A {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n"
        f"-A {chain} -p tcp -j REJECT --reject-with tcp-reset\n"
        f"-A {chain} -j REJECT --reject-with icmp-admin-prohibited\n"
    )
    assert instancenet.listed_rules(chain, listing) == instancenet.chain_rules(ipv6=False)
    assert instancenet.listed_rules(chain, f"-N {chain}\n") == []
    assert len(names.firewall_chain("x" * 15)) <= 28  # iptables' limit on chain names


def test_bad_names_are_refused_before_anything_is_created() -> None:
    import pytest

    from aube.shared.errors import RuntimeFailure

    for network, bridge in (("", "b0"), ("a/b", "b0"), ("net", "x" * 16), ("net", "br 0"), ("net", "")):
        with pytest.raises(RuntimeFailure):
            instancenet.check_names(network, bridge)


def test_the_instance_gets_the_credentials_hash_never_the_credential() -> None:
    import hashlib

    manifest = Manifest(env={names.ENV_INSTANCE_SECRET_SHA256: "0" * 64, "MINE": "1"})
    spec = InstanceSpec(
        function="f", version=1, slot=0, instance_id="i", artifact="a", manifest=manifest, owner="o", secret="s3cr3t"
    )
    env = instance_environment(spec, 8080)
    assert env[names.ENV_INSTANCE_SECRET_SHA256] == hashlib.sha256(b"s3cr3t").hexdigest()
    assert "s3cr3t" not in env.values()
    assert env["MINE"] == "1"
    # Without a credential the function's own [env] cannot set one either.
    bare = instance_environment(
        InstanceSpec(function="f", version=1, slot=0, instance_id="i", artifact="a", manifest=manifest, owner="o"),
        8080,
    )
    assert names.ENV_INSTANCE_SECRET_SHA256 not in bare


def test_restore_input_makes_the_chain_in_one_commit() -> None:
    chain = names.firewall_chain("aube-inst0")
    text = instancenet.restore_input(chain, ipv6=True)
    lines = text.splitlines()
    assert lines[:2] == ["*filter", f":{chain} - [0:0]"]
    assert lines[-1] == "COMMIT"
    assert instancenet.listed_rules(chain, text) == instancenet.chain_rules(ipv6=True)
    assert "icmp6-adm-prohibited" in text
