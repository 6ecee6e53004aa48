"""The fake runtime keeps up with the Runtime protocol: a method the control plane starts to call is one the fake
must have, or every test here fails with an AttributeError far from its cause."""

from __future__ import annotations

import inspect

from fake_runtime import FakeRuntime

from aube.controlplane.runtimes.base import Runtime


def test_the_fake_runtime_has_every_member_of_the_runtime_protocol() -> None:
    members = {name for name in dir(Runtime) if not name.startswith("_")} | set(Runtime.__annotations__)
    fake = FakeRuntime()
    missing = sorted(name for name in members if not hasattr(fake, name))
    assert missing == []
    for name in members - set(Runtime.__annotations__):
        wanted = inspect.iscoroutinefunction(getattr(Runtime, name))
        assert inspect.iscoroutinefunction(getattr(fake, name)) == wanted, name
