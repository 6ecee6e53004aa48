"""pip's command line, environment and sandbox (aube.controlplane.runtimes.pipsandbox and deps' pure parts)."""

from __future__ import annotations

import os
from pathlib import Path

from aube.controlplane.runtimes import deps, pipsandbox
from aube.controlplane.runtimes.pipsandbox import Layout

HOST = Layout.under("/data/cache/builds/pip-1", "/data/cache/pip-build")
PLATFORM_ENV = {
    "AUBE_NATS_URL": "nats://aube:Secret123@127.0.0.1:4222",
    "AUBE_NATS_SERVICE_PASSWORD": "Secret123",
    "AUBE_DATA_DIR": "/data",
    "HOME": "/root",
    "PATH": "/root/.venv/bin:/usr/bin",
    "PYTHONPATH": "/work/repo",
    "LD_PRELOAD": "/tmp/evil.so",
    "PIP_NO_BINARY": ":all:",
    "PIP_INDEX_URL": "https://mirror.example/simple",
    "HTTPS_PROXY": "http://proxy.example:3128",
    "PIP_CERT": "/etc/corp/ca.pem",
    "PIP_FIND_LINKS": "/srv/wheels file:///srv/more https://mirror.example/links",
}


def test_pip_takes_wheels_only_from_the_platforms_own_file() -> None:
    argv = pipsandbox.pip_command("/venv/bin/python", Layout.inside())
    assert argv[:5] == ["/venv/bin/python", "-I", "-m", "pip", "install"]
    assert "--only-binary=:all:" in argv
    assert argv[argv.index("-r") + 1] == "/build/requirements.txt"
    assert argv[argv.index("--target") + 1] == "/build/target"
    assert not any("no-binary" in a or "find-links" in a for a in argv)


def test_environment_starts_empty_and_keeps_only_the_operators_pip_settings() -> None:
    env = pipsandbox.pip_environment(PLATFORM_ENV, Layout.inside())
    assert not any(k.startswith("AUBE_") for k in env)
    assert "Secret123" not in repr(env)
    for dropped in ("PYTHONPATH", "LD_PRELOAD", "PIP_NO_BINARY"):
        assert dropped not in env
    assert env["HOME"] == "/build/home" and env["TMPDIR"] == "/build/tmp"
    assert env["PATH"] == pipsandbox.SANDBOX_PATH
    assert env["PIP_INDEX_URL"] == "https://mirror.example/simple"
    assert env["HTTPS_PROXY"] == "http://proxy.example:3128"
    assert pipsandbox.operator_paths(PLATFORM_ENV) == ["/etc/corp/ca.pem", "/srv/wheels", "/srv/more"]


def test_bwrap_as_root_switches_to_65534_inside_and_binds_only_the_build() -> None:
    sandbox = deps.Sandbox(as_root=True, bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv")
    inner = pipsandbox.pip_command("/venv/bin/python", sandbox.layout(HOST))
    argv, env = sandbox.command(inner, HOST, PLATFORM_ENV)
    assert env == {"PATH": pipsandbox.SANDBOX_PATH}  # bubblewrap's own; the child's comes from --setenv
    assert argv[0] == "/usr/bin/bwrap" and "--clearenv" in argv
    assert "--unshare-pid" in argv and "--unshare-user" not in argv and "--unshare-net" not in argv
    setenv = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--setenv"}
    assert not any(k.startswith("AUBE_") for k in setenv) and "Secret123" not in repr(setenv)
    writable = {argv[i + 1]: argv[i + 2] for i, a in enumerate(argv) if a == "--bind"}
    assert writable == {
        HOST.target: "/build/target",
        HOST.home: "/build/home",
        HOST.tmp: "/build/tmp",
        HOST.cache: "/build/cache",
    }
    read_only = [argv[i + 1] for i, a in enumerate(argv) if a in ("--ro-bind", "--ro-bind-try")]
    assert HOST.requirements in read_only and "/srv/wheels" in read_only and "/etc/corp/ca.pem" in read_only
    assert not any(p in ("/", "/data", "/root", "/etc", "/work") for p in read_only)
    drop = argv.index("/usr/bin/setpriv")
    assert argv[drop : drop + 4] == ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    assert "--no-new-privs" in argv[drop:] and "--bounding-set=-all" in argv[drop:]
    assert argv[argv.index("--", drop) + 1 :] == inner


def test_without_root_bwrap_gets_a_user_namespace_and_no_setpriv() -> None:
    sandbox = deps.Sandbox(as_root=False, bwrap="/usr/bin/bwrap", setpriv="/usr/bin/setpriv")
    argv, _ = sandbox.command(["python"], HOST, PLATFORM_ENV)
    assert "--unshare-user" in argv and "/usr/bin/setpriv" not in argv


def test_without_bwrap_the_drop_and_the_clean_environment_remain() -> None:
    sandbox = deps.Sandbox(as_root=True, bwrap=None, setpriv="/usr/bin/setpriv")
    assert sandbox.layout(HOST) == HOST
    argv, env = sandbox.command(["python", "-m", "pip"], HOST, PLATFORM_ENV)
    assert argv[:3] == ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534"]
    assert argv[-3:] == ["python", "-m", "pip"]
    assert env["HOME"] == HOST.home and not any(k.startswith("AUBE_") for k in env)


def test_mount_point_parents_are_made_open_before_binding() -> None:
    assert pipsandbox.parents(["/work/wt/x/.venv", "/etc/ssl", "/usr", "/build/x"]) == [
        "/build",
        "/etc",
        "/work",
        "/work/wt",
        "/work/wt/x",
    ]
    argv = pipsandbox.bwrap_argv(
        "bwrap", as_root=True, host=HOST, ro_paths=["/work/wt/x/.venv"], env={}, command=["true"]
    )
    first_bind = argv.index("--ro-bind-try")
    made = [argv[i + 1] for i, a in enumerate(argv) if a == "--dir"]
    assert "/work/wt/x" in made and "/build" in made
    assert all(argv.index(folder) < first_bind for folder in made)


def test_build_output_is_bounded_and_renamed() -> None:
    seen: list[str] = []
    out = deps.BuildOutput(seen.append, {"/tmp/aube-pip-1": "/build"})
    out.feed(b"Collecting x\nLooking in links: /tmp/aube-pip-1/cache\n" + b"y" * 5000 + b"\npartial")
    for i in range(deps.MAX_LOG_LINES + 10):
        out.feed(f"line {i}\n".encode())
    out.close()
    assert seen[0] == "Collecting x" and seen[1] == "Looking in links: /build/cache"
    assert len(seen[2]) <= deps.MAX_LINE_CHARS + 10
    assert len(seen) == deps.MAX_LOG_LINES + 1 and seen[-1].startswith("[13 more lines")
    assert list(out.tail)[-1] == f"line {deps.MAX_LOG_LINES + 9}"
    assert len(out.tail) == deps.ERROR_TAIL_LINES


def test_copy_owned_keeps_files_and_dirs_and_drops_the_rest(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text("x = 1\n")
    (src / "pkg" / "tool").write_text("#!/bin/sh\n")
    os.chmod(src / "pkg" / "tool", 0o4755)  # setuid must not survive
    os.mkfifo(src / "pkg" / "fifo")  # must not hang the copy
    (src / "link").symlink_to("pkg/mod.py")
    (src / "outside").symlink_to("/etc")
    deps._copy_owned(src, dest)
    assert (dest / "pkg" / "mod.py").read_text() == "x = 1\n"
    assert oct((dest / "pkg" / "tool").stat().st_mode & 0o7777) == "0o755"
    assert oct((dest / "pkg" / "mod.py").stat().st_mode & 0o7777) == "0o644"
    assert not (dest / "pkg" / "fifo").exists()
    assert not (dest / "link").is_symlink() and not (dest / "outside").is_symlink()
    assert sorted(p.name for p in dest.rglob("*")) == ["mod.py", "pkg", "tool"]
