"""The test rig's pure parts (scripts/rig): what each service is given, and the import finder that the rig's
containers use for the read-only checkout (tested here on a checkout of its own, in a Python without site)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rig import layout
from rig.container import aube_checkout

LOGINS = layout.Logins(
    users={"proxy": ("aube-proxy", "P_PASSWORD"), "controlplane": ("aube-controlplane", "C_PASSWORD")},
    passwords={"P_PASSWORD": "p-secret", "C_PASSWORD": "c-secret", "AUBE_NATS_FETCH_PASSWORD": "f-secret"},
)


def test_a_service_gets_its_own_login_only_and_every_nats_node() -> None:
    proxy = layout.runnable(layout.ServiceSpec(name="proxy", module="aube.proxy", login="proxy"), LOGINS)
    assert proxy.env["AUBE_NATS_USER"] == "aube-proxy" and proxy.env["AUBE_NATS_PASSWORD"] == "p-secret"
    assert not {"c-secret", "f-secret"} & set(proxy.env.values())
    assert proxy.env["AUBE_NATS_URL"] == "nats://aube-nats-1:4222,nats://aube-nats-2:4222,nats://aube-nats-3:4222"
    plane = layout.ServiceSpec(
        name="cp", module="aube.controlplane", login="controlplane", secrets=("AUBE_NATS_FETCH_PASSWORD",)
    )
    env = layout.runnable(plane, LOGINS).env
    assert env["AUBE_NATS_FETCH_PASSWORD"] == "f-secret" and "p-secret" not in env.values()


def test_a_service_of_an_unknown_platform_user_is_refused() -> None:
    spec = layout.ServiceSpec(name="agent", module="aube.agent", login="agent")
    with pytest.raises(ValueError, match="agent"):
        layout.runnable(spec, LOGINS)


def _checkout(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    (root / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"aube.core" = "core"\n"aube.svc" = "services/svc"\n'
    )
    for folder, files in {"core": ["__init__.py"], "services/svc": ["__init__.py", "run.py"]}.items():
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).write_text(f"WHERE = {folder + '/' + name!r}\n")
    return root


def test_modules_are_found_by_the_checkouts_package_table(tmp_path: Path) -> None:
    root = _checkout(tmp_path)
    assert aube_checkout.module_file(root, "aube.svc.run") == root / "services/svc/run.py"
    assert aube_checkout.module_file(root, "aube.svc") == root / "services/svc/__init__.py"
    assert aube_checkout.has_module(root, "aube.core")
    assert not aube_checkout.has_module(root, "aube.agent")  # not in the table: a service not written yet
    assert not aube_checkout.has_module(root, "aube.svc.missing")
    assert not aube_checkout.has_module(tmp_path / "nowhere", "aube.core")


def test_the_finder_imports_the_checkout_in_a_python_that_has_not_installed_it(tmp_path: Path) -> None:
    root = _checkout(tmp_path / "checkout")
    finder_dir = Path(aube_checkout.__file__).parent
    code = (
        f"import sys; sys.path.insert(0, {str(finder_dir)!r})\n"
        f"import aube_checkout; aube_checkout.install({str(root)!r})\n"
        "import aube.svc.run, aube.core\n"
        "print(aube.svc.run.WHERE, aube.core.WHERE)\n"
    )
    # -S: no site packages, so not the editable install of this checkout that the test's own Python has.
    ran = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert ran.stdout.split() == ["services/svc/run.py", "core/__init__.py"], ran.stderr
