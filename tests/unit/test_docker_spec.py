"""The Docker runtime's container options (runtimes/docker_spec.py): the hardening every instance gets, pure."""

from __future__ import annotations

from pathlib import Path

import pytest

from aube.controlplane.runtimes import docker_spec, handoffdir
from aube.controlplane.runtimes.base import InstanceSpec
from aube.shared import names
from aube.shared.schemas import LimitsSection, Manifest
from aube.shared.settings import ControlPlaneSettings

SETTINGS = ControlPlaneSettings(publish_host="127.0.0.2", instance_network="aube-test-net")


def test_host_config_is_hardened_and_limited_by_the_manifest() -> None:
    limits = LimitsSection(memory="512m", cpus=0.25, pids=64)
    options = docker_spec.host_config_options(limits, SETTINGS, Path("/run/x/y"), init=True)
    assert options["mem_limit"] == options["memswap_limit"] == 512 * 1024 * 1024  # no swap on top
    assert options["nano_cpus"] == 250_000_000 and options["pids_limit"] == 64
    assert options["read_only"] is True and options["cap_drop"] == ["ALL"]
    assert options["security_opt"] == ["no-new-privileges"]
    assert options["port_bindings"] == {docker_spec.PORT_KEY: ("127.0.0.2", None)}  # the publish host only
    assert options["network_mode"] == "aube-test-net"
    assert options["binds"] == {"/run/x/y": {"bind": handoffdir.CONTAINER_DIR, "mode": "rw"}}
    assert options["init"] is True
    # An engine without docker-init refuses the key itself: None leaves it out.
    assert docker_spec.host_config_options(limits, SETTINGS, Path("/h"), init=False)["init"] is None


def test_an_unparseable_memory_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="is not a size"):
        docker_spec.host_config_options(LimitsSection(memory="lots"), SETTINGS, Path("/h"), init=True)


def test_container_runs_as_nobody_with_the_instance_labels_and_handoff_path() -> None:
    spec = InstanceSpec(
        function="echo", version=3, slot=2, instance_id="abc123", artifact="img", manifest=Manifest(), owner="o1"
    )
    options = docker_spec.container_options(spec, "aube-o1-echo-abc123", {"fake": "host config"})
    assert options["user"] == "65534:65534"
    assert options["labels"][names.LABEL_OWNER] == "o1" and options["labels"][names.LABEL_INSTANCE] == "abc123"
    assert options["environment"][handoffdir.ENV_HANDOFF].startswith(handoffdir.CONTAINER_DIR + "/")
    assert options["host_config"] == {"fake": "host config"}
    assert options["stop_timeout"] == docker_spec.STOP_GRACE
